"""Discriminators for adversarial distillation: register-token heads on a backbone's hidden states."""
