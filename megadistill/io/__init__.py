"""Files of tensors: reading and writing weight files (tensors.py)."""
