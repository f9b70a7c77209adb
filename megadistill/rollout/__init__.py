"""Training-time rollouts (Self-Forcing causal, bidirectional) and few-step inference pipelines."""
