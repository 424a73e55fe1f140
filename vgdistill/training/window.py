"""The student's logging window: loss sums since the last log line, kept on the device so a
step needs no device sync, and summed over every process in one collective call."""

from __future__ import annotations

import time
from typing import Any

import torch


class Window:
    """Sums of the micro-batches since the last log line (loss, parts, non-finite count)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.parts: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.micro = 0
        self.images = 0
        self.bad = torch.zeros((), device=device)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], images: int) -> None:
        """Add one micro-batch without a device sync."""
        loss = loss.detach().float()
        self.bad = self.bad + (~torch.isfinite(loss)).float()
        self.loss = self.loss + loss
        if not self.names:
            self.names = sorted(parts)
            self.parts = {n: torch.zeros((), device=self.device) for n in self.names}
        for n in self.names:
            self.parts[n] = self.parts[n] + parts[n].detach().float()
        self.micro += 1
        self.images += images

    def sync(self, acc: Any, stop: bool) -> dict[str, float]:
        """All-reduce the window and the stop flag: mean loss and parts, plus "_images",
        "_bad" (non-finite losses) and "_stop" (processes asking to stop)."""
        device = self.device
        local = torch.stack(
            [self.loss, *[self.parts[n] for n in self.names]]
            + [
                torch.tensor(float(self.micro), device=device),
                torch.tensor(float(self.images), device=device),
                self.bad,
                torch.tensor(float(stop), device=device),
            ]
        ).float()
        total = acc.reduce(local, "sum").cpu().tolist()
        k = len(self.names)
        micro = max(total[k + 1], 1.0)
        out = {"loss": total[0] / micro}
        out.update({n: total[1 + i] / micro for i, n in enumerate(self.names)})
        out["_images"], out["_bad"], out["_stop"] = total[k + 2], total[k + 3], total[k + 4]
        return out
