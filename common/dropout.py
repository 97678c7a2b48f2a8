"""Scheduled dropout (paper names it; the schedule shapes are our choice): every dropout probability of the model
moves from its start value to `end_p` over training — constant, linear, cosine, or a step at `step_at`."""
from __future__ import annotations

import math
import re

from torch import nn

SCHEDULES = ("constant", "linear", "cosine", "step")


# float attributes holding a dropout rate that the module's forward passes to a functional dropout or attention call:
# `dropout` (HF Wav2Vec2Attention, BART), `*_dropout` (Llama's attention_dropout, BART/Whisper's activation_dropout),
# `*dropout_prob`, `*dropout_rate` (HF ViT's dropout_prob). choice: by name, as models do not declare them otherwise.
_RATE_NAME = re.compile(r"(^|_)dropout(_prob|_rate)?$")


def _dropout_sites(model: nn.Module):
    """(module, attribute) pairs holding a dropout probability: nn.Dropout modules' `p`, and float attributes of other
    modules named like a dropout rate (see _RATE_NAME) with a value in [0, 1] (configs are not modules: not
    visited)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            yield mod, "p"
            continue
        for attr, v in vars(mod).items():
            if isinstance(v, float) and 0.0 <= v <= 1.0 and _RATE_NAME.search(attr):
                yield mod, attr


class ScheduledDropout:
    def __init__(self, model: nn.Module, total_steps: int, schedule: str = "linear", end_p: float = 0.0,
                 start_p: float | None = None, step_at: float | None = 0.5):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown dropout schedule {schedule!r}; allowed: {SCHEDULES}")
        self.sites = list(_dropout_sites(model))
        # start: each site's configured p (hidden and attention dropout may differ), unless start_p overrides it
        self.start = [getattr(m, a) if start_p is None else start_p for m, a in self.sites]
        # step_at None (a config's null): halfway
        self.total, self.schedule, self.end_p = max(1, total_steps), schedule, end_p
        self.step_at = 0.5 if step_at is None else float(step_at)

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
