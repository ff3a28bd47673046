"""A small iteration-based training loop with hooks (in the spirit of Detectron2's SimpleTrainer).

One step: fetch a batch (timed as ``data_time``), forward to a dict of losses,
sum them, check every loss is finite (across all processes) *before* the
optimizer step, backward (with a GradScaler for fp16), optional gradient
clipping, optimizer step, EMA update. Everything else (LR schedule,
checkpoints, evaluation, logging) lives in hooks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .distributed import get_world_size, is_distributed, unwrap_model
from .ema import ModelEMA

__all__ = ["HookBase", "MetricStorage", "Trainer", "autocast_context", "default_loss_fn", "resolve_amp"]

logger = logging.getLogger("detkit.engine")

AmpMode = Literal["none", "fp16", "bf16", "auto"]


class HookBase:
    """Extension point of :class:`Trainer`. ``self.trainer`` is set when registered.

    ``after_train`` is always called (also after an exception); hooks that must not
    act on a failed run (e.g. saving weights) check ``self.trainer.failed``.
    """

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class MetricStorage:
    """Scalars produced during training, with a short history for smoothing.

    Attributes:
        iter: the iteration being run (0-based).
        latest: ``name -> (value, iteration)`` of the last value put for each name.
        eval_results: the last evaluation metrics and the number of completed
            iterations they belong to.
    """

    def __init__(self, window: int = 20) -> None:
        self.iter = 0
        self.window = window
        self._history: dict[str, deque] = {}
        self.latest: dict[str, tuple[float, int]] = {}
        self.eval_results: dict[str, float] = {}
        self.eval_iteration: int = -1
        self.skipped_images = 0

    def put_scalar(self, name: str, value: float) -> None:
        """Record one value of ``name`` at the current iteration."""
        value = float(value)
        self._history.setdefault(name, deque(maxlen=self.window)).append(value)
        self.latest[name] = (value, self.iter)

    def put_scalars(self, **values: float) -> None:
        for k, v in values.items():
            self.put_scalar(k, v)

    def median(self, name: str, window: Optional[int] = None) -> float:
        """Median of the last ``window`` values of ``name``."""
        hist = list(self._history[name])[-(window or self.window):]
        return float(sorted(hist)[len(hist) // 2])

    def avg(self, name: str, window: Optional[int] = None) -> float:
        """Mean of the last ``window`` values of ``name``."""
        hist = list(self._history[name])[-(window or self.window):]
        return float(sum(hist) / len(hist))

    def put_eval(self, metrics: dict[str, float], completed_iters: int) -> None:
        """Store evaluation metrics for the hooks that run after the evaluation."""
        self.eval_results = dict(metrics)
        self.eval_iteration = completed_iters


def default_loss_fn(model: nn.Module, batch: Any) -> dict[str, Tensor]:
    """Detection step: ``model(batch.images, batch.targets)`` -> loss dict."""
    return model(batch.images, batch.targets)


def resolve_amp(amp: AmpMode, device: torch.device) -> AmpMode:
    """The mixed precision a run really uses on ``device``.

    ``"auto"``: bf16 where the device runs it natively (an Ampere+ GPU, or a CPU with AVX512-BF16 /
    AMX / Arm BF16), fp16 on older GPUs, otherwise none. An explicit ``"fp16"`` off CUDA and an
    explicit ``"bf16"`` on a CPU that would only emulate it fall back to ``"none"`` with a warning.
    """
    from ..inference.optimize import bf16_supported

    device = torch.device(device)
    if amp == "auto":
        if bf16_supported(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        logger.warning("train.amp=fp16 needs a CUDA device; training in fp32 on %s (use bf16 on CPU)", device)
        return "none"
    if amp == "bf16" and device.type == "cpu" and not bf16_supported(device):
        logger.warning("train.amp=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so it would be "
                       "emulated and slower than fp32; training in fp32 (train.amp=auto picks for you)")
        return "none"
    return amp


def autocast_context(device: torch.device, amp: AmpMode) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` ("fp16"/"bf16") on ``device``, or a null context."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Iteration-based loop: runs iterations ``start_iter .. max_iters - 1`` calling hooks around each.

    Args:
        model: the (possibly DDP-wrapped) model in training mode.
        optimizer: its optimizer.
        data_loader: an iterable of batches (an infinite training loader); an
            iterator is taken from it once.
        max_iters: total number of iterations of the run.
        start_iter: first iteration to run (the number already completed, when resuming).
        hooks: hooks called in order.
        device: where batches are moved (anything with ``.to(device)``).
        amp: "none", "fp16" (CUDA only; uses a GradScaler), "bf16" (CUDA or CPU), or "auto"
            (see :func:`resolve_amp`).
        clip_grad_norm: max global gradient norm; 0 disables clipping.
        ema: optional :class:`ModelEMA`, updated after every optimizer step.
        loss_fn: ``(model, batch) -> dict of losses``; defaults to the detection call.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: Iterable[Any],
        max_iters: int,
        start_iter: int = 0,
        hooks: Sequence[HookBase] = (),
        device: torch.device | str = "cpu",
        amp: AmpMode = "none",
        clip_grad_norm: float = 0.0,
        ema: Optional[ModelEMA] = None,
        loss_fn: Callable[[nn.Module, Any], dict[str, Tensor]] = default_loss_fn,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self._data_iter: Optional[Iterator[Any]] = None
        self.max_iters = int(max_iters)
        self.start_iter = int(start_iter)
        self.iter = self.start_iter
        self.device = torch.device(device)
        self.amp: AmpMode = resolve_amp(amp, self.device)
        if amp == "auto":
            logger.info("train.amp=auto: %s on %s", "fp32" if self.amp == "none" else self.amp, self.device.type)
        # loss scaling follows the precision really used (auto may resolve to fp16; fp16 off CUDA to none)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.amp == "fp16"))
        self.clip_grad_norm = float(clip_grad_norm)
        self.ema = ema
        self.loss_fn = loss_fn
        self.storage = MetricStorage()
        self.failed = False
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        """Append hooks (called in registration order)."""
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        """Run the loop. Exceptions propagate after every hook's ``after_train`` ran."""
        logger.info("Starting training from iteration %d to %d", self.start_iter, self.max_iters)
        self.failed = False
        try:
            for h in self.hooks:
                h.before_train()
            for self.iter in range(self.start_iter, self.max_iters):
                self.storage.iter = self.iter
                for h in self.hooks:
                    h.before_step()
                self.run_step()
                for h in self.hooks:
                    h.after_step()
            self.iter = self.max_iters
        except BaseException:
            self.failed = True
            raise
        finally:
            self._after_train()

    def _after_train(self) -> None:
        errors = []
        for h in self.hooks:
            try:
                h.after_train()
            except Exception as e:  # keep closing the remaining hooks
                if not self.failed:
                    errors.append(e)
                else:
                    logger.warning("hook %s failed after an error: %s", type(h).__name__, e)
        if errors:
            raise errors[0]

    def _next_batch(self) -> Any:
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        return next(self._data_iter)

    def _fetch_nonempty_batch(self, max_tries: int = 100) -> Any:
        """Next batch with at least one image; unreadable images are counted and logged."""
        for _ in range(max_tries):
            batch = self._next_batch()
            skipped = getattr(batch, "skipped", None) or []
            if skipped:
                self.storage.skipped_images += len(skipped)
                for path in skipped:
                    logger.warning("iteration %d: skipped unreadable image %s", self.iter + 1, path)
            images = getattr(batch, "images", None)
            if images is None or len(images) > 0:
                return batch
        raise RuntimeError(f"{max_tries} consecutive batches had no readable image; check the image folder")

    def run_step(self) -> None:
        """One optimization step (see the module docstring)."""
        self.model.train()
        t0 = time.perf_counter()
        batch = self._fetch_nonempty_batch()
        data_time = time.perf_counter() - t0
        if hasattr(batch, "to"):
            batch = batch.to(self.device)

        with autocast_context(self.device, self.amp):
            loss_dict = self.loss_fn(self.model, batch)
        losses = sum(v.float() for v in loss_dict.values())
        loss_values = self._reduced_loss_values(loss_dict, losses)
        self._check_finite(loss_values)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses).backward()
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.storage.put_scalar("grad_norm", float(grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(unwrap_model(self.model))

        self.storage.put_scalar("data_time", data_time)
        self.storage.put_scalar("time", time.perf_counter() - t0)
        for k, v in loss_values.items():
            self.storage.put_scalar(k, v)

    def _reduced_loss_values(self, loss_dict: dict[str, Tensor], total: Tensor) -> dict[str, float]:
        """Mean of each loss (and ``total_loss``) over processes, as floats (one collective)."""
        keys = sorted(loss_dict)
        vec = torch.stack([loss_dict[k].detach().float().reshape(()) for k in keys] + [total.detach().reshape(())])
        if is_distributed() and get_world_size() > 1:
            torch.distributed.all_reduce(vec)
            vec = vec / get_world_size()
        values = vec.cpu().tolist()
        out = dict(zip(keys, values[:-1]))
        out["total_loss"] = values[-1]
        return out

    def _check_finite(self, loss_values: dict[str, float]) -> None:
        if all(math.isfinite(v) for v in loss_values.values()):
            return
        parts = ", ".join(f"{k}={v:.4g}" for k, v in loss_values.items() if k != "total_loss")
        raise FloatingPointError(
            f"iteration {self.iter + 1}: non-finite loss: {parts}; stopped before the optimizer step "
            "(lower train.base_lr, raise train.warmup_iters or set train.clip_grad_norm)"
        )
