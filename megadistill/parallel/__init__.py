"""Device mesh, tensor and sequence parallelism, memory planning."""
