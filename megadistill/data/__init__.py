"""Data: datasets, loaders and video files."""
