"""Shared fixtures: small honest fake models, and the real demo model's config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.config import Config, ModelConfig, PredictionConfig, load_config

# Real-Label-Studio fixtures live in their own module (tests/ls_fixtures.py).
pytest_plugins = ("ls_fixtures", "pg_fixtures")

REPO = Path(__file__).resolve().parent.parent


class ColourModel(torch.nn.Module):
    """Channel c is 'colour channel c is bright': logits (x_c - 0.5) * 40, pooled by ``stride``.

    With mean 0 and std 1 the input is the [0, 1] image, so the right mask is known exactly.
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = (x[:, : self.channels] - 0.5) * 40.0
        if self.stride > 1:
            logits = torch.nn.functional.avg_pool2d(logits, self.stride)
        return logits


@pytest.fixture
def colour_model(tmp_path: Path) -> Callable[..., ModelConfig]:
    """Build a ModelConfig for a scripted ColourModel saved under tmp_path."""

    def make(channels: int = 2, stride: int = 1, **overrides: object) -> ModelConfig:
        path = tmp_path / f"colour_{channels}_{stride}.pt"
        torch.jit.save(torch.jit.script(ColourModel(channels, stride)), str(path))
        labels = ("red", "green", "blue")[:channels]
        config = ModelConfig(
            path=path,
            labels=labels,
            input_size=None,
            size_divisor=8,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            device="cpu",
            batch_size=4,
        )
        return dataclasses.replace(config, **overrides)  # type: ignore[arg-type]

    return make


@pytest.fixture
def prediction() -> PredictionConfig:
    return PredictionConfig(min_pixels=0, prob_upsample=False)


@pytest.fixture(scope="session")
def repo_config() -> Config:
    """The shipped config.yaml: the bundled demo model."""
    return load_config(REPO / "config.yaml", environ={})
