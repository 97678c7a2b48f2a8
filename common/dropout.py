"""Scheduled dropout (paper names it; the schedule shapes are our choice): every dropout probability of the model
moves from its start value to `end_p` over training — constant, linear, cosine, or a step at `step_at`."""
from __future__ import annotations

import math

from torch import nn

SCHEDULES = ("constant", "linear", "cosine", "step")


def _dropout_sites(model: nn.Module):
    """(module, attribute) pairs holding a dropout probability: nn.Dropout modules, and float `dropout`
    attributes of attention modules that pass it to a functional call (e.g. HF Wav2Vec2Attention)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            yield mod, "p"
        elif isinstance(getattr(mod, "dropout", None), float):
            yield mod, "dropout"


class ScheduledDropout:
    def __init__(self, model: nn.Module, total_steps: int, schedule: str = "linear", end_p: float = 0.0,
                 start_p: float | None = None, step_at: float = 0.5):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown dropout schedule {schedule!r}; allowed: {SCHEDULES}")
        self.sites = list(_dropout_sites(model))
        # start: each site's configured p (hidden and attention dropout may differ), unless start_p overrides it
        self.start = [getattr(m, a) if start_p is None else start_p for m, a in self.sites]
        self.total, self.schedule, self.end_p, self.step_at = max(1, total_steps), schedule, end_p, step_at

    def factor(self, step: int) -> float:
        """1 at the start, 0 at the end (how far from end_p towards the start value)."""
        t = min(max(step / self.total, 0.0), 1.0)
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "linear":
            return 1.0 - t
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0 if t < self.step_at else 0.0

    def step(self, step: int) -> float:
        f = self.factor(step)
        for (mod, attr), p0 in zip(self.sites, self.start):
            setattr(mod, attr, self.end_p + (p0 - self.end_p) * f)
        return f

    def current(self) -> list[float]:
        return [getattr(m, a) for m, a in self.sites]
