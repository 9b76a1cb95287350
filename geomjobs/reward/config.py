"""The reward model's training settings: their one home (the trainer and the CLI's help read
them here; a module without JAX, so ``geomjobs --help`` stays fast)."""
from __future__ import annotations

import dataclasses

from geomjobs.errors import SpecError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 100
    patience: int = 8
    val_fraction: float = 0.1
    val_rows: int = 20000
    seed: int = 0
    hidden: int | None = None
    depth: int | None = None
    temb: int | None = None
    channels: int | None = None

    def check(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "patience", "val_rows"):
            if getattr(self, key) < 1:
                raise SpecError(f"--{key.replace('_', '-')}", f"expected a positive integer, got {getattr(self, key)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise SpecError("--val-fraction", f"expected a fraction in (0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            raise SpecError("--lr", f"expected a positive learning rate, got {self.lr}")
