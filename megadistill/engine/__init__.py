"""DeepSpeed training engine: configs, engines, the distillation loop, sharded EMA and checkpoints."""
