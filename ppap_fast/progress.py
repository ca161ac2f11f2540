"""Training progress bars that show the loss without a host sync per step."""
from __future__ import annotations

import math
import time

import torch


class BarLoss:
    """Shows on a tqdm ``bar`` the mean loss of the steps since it last did, at most every ``every_s`` seconds.
    Losses given as device tensors stay there until then: one host read per update, none per step. Any other
    ``bar`` (None: no progress bar) makes :meth:`add` do nothing."""

    def __init__(self, bar, every_s: float = 2.0):
        self.bar = bar if hasattr(bar, "set_postfix") else None
        self.every_s, self.pending, self.shown_at = float(every_s), [], -math.inf

    def add(self, loss) -> None:
        if self.bar is None:
            return
        self.pending.append(loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)))
        now = time.monotonic()
        if now - self.shown_at < self.every_s:
            return
        mean = float(torch.stack([v.to(self.pending[0].device) for v in self.pending]).double().mean())
        self.pending.clear()
        self.shown_at = now
        self.bar.set_postfix(loss=f"{mean:.4g}", refresh=False)
