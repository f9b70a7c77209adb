"""The demo: a procedural text-to-video set, its prompt encoder, a tiny shipped Wan teacher and sample metrics."""
