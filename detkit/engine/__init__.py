"""Training and evaluation engine: the iteration loop, its hooks, DDP helpers and run setup.

Layering: the engine may use ``structures``, ``config``, ``data``, ``models``,
``evaluation`` and ``checkpoint``; only the tools import the engine.
"""

from __future__ import annotations

from typing import Any

from .checkpointing import BestCheckpointer, PeriodicCheckpointer, restore_training_state, training_state
from .ema import ModelEMA
from .hooks import EvalHook, EvalMetricsWriter, LRScheduler, MetricsWriter, ProgressBar, VisualizationHook
from .lr_schedule import LRSchedule, lr_factor
from .optim import build_adamw, build_sgd, param_groups
from .trainer import HookBase, MetricStorage, Trainer, resolve_amp

__all__ = [
    "Trainer",
    "HookBase",
    "MetricStorage",
    "resolve_amp",
    "LRSchedule",
    "lr_factor",
    "LRScheduler",
    "EvalHook",
    "MetricsWriter",
    "EvalMetricsWriter",
    "ProgressBar",
    "VisualizationHook",
    "PeriodicCheckpointer",
    "BestCheckpointer",
    "training_state",
    "restore_training_state",
    "ModelEMA",
    "build_sgd",
    "build_adamw",
    "param_groups",
    "inference_on_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "inference_on_dataset":  # imports the detector models: loaded on first use
        from .evaluate import inference_on_dataset

        return inference_on_dataset
    raise AttributeError(f"module 'detkit.engine' has no attribute {name!r}")
