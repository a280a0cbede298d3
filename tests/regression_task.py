"""A new task in one short file: least-squares regression on random data, trained by the run engine.

Run it as a script (``python tests/regression_task.py epochs=3 output=runs/reg``, also under torchrun)
or through ``runs.train(Regression, None, overrides)``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tokenmixers import runs
from tokenmixers.distributed import all_reduce_sum


@dataclass(frozen=True)
class RegressionSettings(runs.RunSettings):
    """The engine's settings plus the task's own."""

    features: int = 8
    samples: int = 96
    noise: float = 0.1
    dropout: float = 0.1  # makes the training depend on the RNG: resuming must restore it


class Regression(runs.Task):
    """Fit y = x w + noise with a two-layer MLP; the best weights have the lowest validation MSE."""

    name = "regression"
    settings = RegressionSettings
    best_metric, best_mode = "mse", "min"

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(self.cfg.samples, self.cfg.features, generator=g)
        y = x @ torch.randn(self.cfg.features, 1, generator=g) + self.cfg.noise * torch.randn(len(x), 1, generator=g)
        n = len(x) * 3 // 4
        return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.cfg.features, 16), nn.GELU(), nn.Dropout(self.cfg.dropout), nn.Linear(16, 1))

    def step(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(model(x), y)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        totals = torch.zeros(2, dtype=torch.float64)
        for prediction, y, _ in runs.predictions(model, loader, self.info):
            totals += torch.stack([((prediction.cpu() - y) ** 2).sum(), torch.tensor(float(len(y)))]).double()
        totals = all_reduce_sum(totals)
        return {"mse": (totals[0] / totals[1]).item()}


if __name__ == "__main__":
    runs.train(Regression, None, sys.argv[1:])
