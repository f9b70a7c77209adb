"""The generic loop: update schedule (generator every critic_ratio steps, critic every step), grad
clearing between the two updates, and the generator EMA."""
import copy

import torch

from megadistill.methods.base import DistillationMethod
from megadistill.toylab.config import LoopConfig
from megadistill.toylab.loop import train_distillation, update_ema


class Counting(DistillationMethod):
    has_critic = True

    def __init__(self):
        self.generator = torch.nn.Linear(1, 1, bias=False)
        self.critic = torch.nn.Linear(1, 1, bias=False)
        self.calls = []

    def generator_parameters(self):
        return list(self.generator.parameters())

    def critic_parameters(self):
        return list(self.critic.parameters())

    def generator_loss(self, batch, step):
        self.calls.append(("g", step))
        # Like SiD: the generator loss also reaches the critic's parameters.
        return (self.generator.weight * self.critic.weight).sum(), {}

    def critic_loss(self, batch, step):
        assert self.critic.weight.grad is None  # cleared after the generator step
        self.calls.append(("c", step))
        return (self.critic.weight ** 2).sum(), {}


def test_schedule_and_grad_clearing():
    m = Counting()
    train_distillation(m, lambda step: None, LoopConfig(iterations=7, critic_ratio=3, lr=1e-2, lr_critic=1e-2))
    assert [c for c in m.calls if c[0] == "g"] == [("g", 0), ("g", 3), ("g", 6)]
    assert [c for c in m.calls if c[0] == "c"] == [("c", s) for s in range(7)]
    assert m.calls[:2] == [("g", 0), ("c", 0)]  # upstream order within a step


def test_ema_tracks_generator():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = copy.deepcopy(a)
    update_ema(ema, b, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * a.weight + 0.1 * b.weight)
