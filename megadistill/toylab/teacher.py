"""Flow-matching training of the toy teacher (seconds on one CPU core)."""
from __future__ import annotations

import torch

from megadistill.diffusion.flow_match import add_noise_continuous, flow_target
from megadistill.models.toy.mlp import ToyFlowMLP

from .config import TeacherConfig, ToyDataConfig
from .data import random_labels, sample_data


def train_teacher(data: ToyDataConfig, cfg: TeacherConfig, seed: int) -> ToyFlowMLP:
    """Conditional flow matching with label dropout; sigma ~ U(0, 1); Adam with cosine decay."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ToyFlowMLP(dim=data.dim, num_classes=data.num_classes, hidden=cfg.hidden, depth=cfg.depth)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations, eta_min=cfg.lr * 0.05)
    for _ in range(cfg.iterations):
        labels = random_labels(data, cfg.batch_size, g)
        x0 = sample_data(data, labels, g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(cfg.batch_size, generator=g)
        x_t = add_noise_continuous(x0, eps, sigma)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
        cond = torch.where(drop, torch.full_like(labels, net.null_class), labels)
        loss = ((net(x_t, sigma * 1000.0, cond) - flow_target(x0, eps)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()
