"""Training checkpoints: what they hold, how they are written, and how a run resumes from one.

A training checkpoint is a plain dict saved atomically with
:func:`detkit.checkpoint.save_checkpoint` and read back with ``weights_only=True``:

``model`` (state dict), ``optimizer``, ``scaler``, ``scheduler`` (schedule
description and iteration), ``iteration`` (number of completed iterations),
``rng_states`` (python, numpy, torch and CUDA states of every process),
``ema`` (or None) and ``config`` (the resolved config as plain types).
``last.pth`` (and the numbered copies) and ``best.pth`` all hold this full state;
``best.pth`` adds ``metric`` (``{name: value}``). ``--resume`` restores the raw model
*and* the EMA; :func:`detkit.load_weights` (evaluation, prediction, export,
``model.weights``) takes the EMA weights when there are some.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
from .distributed import all_gather_object, barrier, get_rank, get_world_size, is_main_process, unwrap_model
from .ema import ModelEMA
from .trainer import HookBase

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "training_state",
    "restore_training_state",
    "resume_from_last",
    "PeriodicCheckpointer",
    "BestCheckpointer",
]

logger = logging.getLogger("detkit.engine")


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    scheduler: Optional[dict] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[ModelEMA] = None,
    config: Optional[dict] = None,
    rng_states: Optional[list[dict]] = None,
    extra: Optional[dict] = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (see the module docstring)."""
    state: dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "scheduler": dict(scheduler or {}, iteration=iteration),
        "iteration": int(iteration),
        "rng_states": rng_states if rng_states is not None else [get_rng_state()],
        "ema": ema.state_dict() if ema is not None else None,
        "config": config or {},
    }
    if extra:
        state.update(extra)
    return state


def restore_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[ModelEMA] = None,
) -> dict[str, Any]:
    """Load a training checkpoint into the live objects (strictly) and return the checkpoint dict.

    The RNG state of this process's rank is restored (rank 0's when the world size changed).

    Raises:
        CheckpointError (one line): the file is unreadable or not a detkit training checkpoint, or its
            weights do not fit the model (another architecture or class count); the message lists the
            mismatched, missing and unexpected keys.
    """
    from ..checkpoint import CheckpointError, compare_state_dict

    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "iteration") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a detkit training checkpoint (missing {', '.join(missing)}); "
            "use model.weights to initialize from plain weights instead of --resume"
        )
    net = unwrap_model(model)
    report = compare_state_dict(net, ckpt["model"], str(path))
    if not report.fits:
        raise CheckpointError(_resume_mismatch_message(path, report.problems()))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # names and shapes were checked; keep any other reason on one line
        raise CheckpointError(_resume_mismatch_message(path, " ".join(str(e).split())[:500])) from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: cannot resume, its optimizer state does not fit this optimizer ({' '.join(str(e).split())}); "
            "the parameter groups changed (e.g. train.weight_decay_norm/weight_decay_bias or frozen layers): "
            "resume with the config it was trained with, or start a new output directory with "
            f"model.weights={path} to fine-tune from its weights"
        ) from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        else:
            ema.module.load_state_dict(unwrap_model(model).state_dict())
    rng = ckpt.get("rng_states") or []
    if rng:
        set_rng_state(rng[get_rank()] if len(rng) == get_world_size() else rng[0])
    return ckpt


def resume_from_last(
    output_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[ModelEMA] = None,
) -> Optional[dict[str, Any]]:
    """``--resume``: restore ``output_dir/checkpoints/last.pth`` into the live objects.

    Returns the checkpoint dict (``iteration`` and whatever the run stored), or None with a
    warning when the run has no ``last.pth`` yet (it then starts from scratch).
    """
    last = Path(output_dir) / "checkpoints" / "last.pth"
    if not last.is_file():
        logger.warning("--resume: %s not found; starting from scratch", last)
        return None
    ckpt = restore_training_state(last, model, optimizer, scaler, ema)
    logger.info("Resumed from %s at iteration %d", last, int(ckpt["iteration"]))
    return ckpt


def _resume_mismatch_message(path: str | Path, problems: str) -> str:
    return (
        f"{path}: cannot resume, its weights do not fit this model: {problems}; this checkpoint is for "
        "another architecture or class count: resume with the config it was trained with, or start a new "
        f"output directory with model.weights={path} to fine-tune from it instead of --resume"
    )


class PeriodicCheckpointer(HookBase):
    """Writes ``checkpoints/last.pth`` every ``period`` iterations and at the end (rank 0).

    A numbered copy ``model_XXXXXXX.pth`` (completed iterations, 7 digits) is also
    written at each period; only the newest ``keep_last`` of them are kept.
    Nothing is written when the run failed (so ``last.pth`` stays the last good one).

    Args:
        checkpoint_dir: the ``checkpoints`` folder.
        period: in iterations; 0 means only at the end.
        keep_last: numbered checkpoints to keep (0: none).
        config: resolved config dict stored in every checkpoint.
        scheduler_state: schedule description stored in every checkpoint.
        extra: ``completed_iters -> dict`` of additional entries (e.g. epoch, class names).
    """

    NUMBERED = re.compile(r"model_(\d{7})\.pth$")

    def __init__(
        self,
        checkpoint_dir: str | Path,
        period: int,
        keep_last: int = 3,
        config: Optional[dict] = None,
        scheduler_state: Optional[dict] = None,
        extra: Optional[Callable[[int], dict]] = None,
    ) -> None:
        self.dir = Path(checkpoint_dir)
        self.extra = extra
        self.period = int(period)
        self.keep_last = int(keep_last)
        self.config = config or {}
        self.scheduler_state = scheduler_state or {}
        self.last_saved_iter = -1

    def save(self, completed: int, numbered: bool = True) -> None:
        """Gather RNG states from all processes and write the checkpoint on rank 0."""
        t = self.trainer
        rng_states = all_gather_object(get_rng_state())
        if is_main_process():
            state = training_state(
                t.model, t.optimizer, completed, self.scheduler_state, t.scaler, t.ema, self.config, rng_states,
                extra=self.extra(completed) if self.extra is not None else None,
            )
            self.dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(state, self.dir / "last.pth")
            if numbered and self.keep_last > 0:
                save_checkpoint(state, self.dir / f"model_{completed:07d}.pth")
                self._prune()
            logger.info("Saved checkpoint %s (iteration %d)", self.dir / "last.pth", completed)
        self.last_saved_iter = completed
        barrier()

    def _prune(self) -> None:
        numbered = sorted(p for p in self.dir.glob("model_*.pth") if self.NUMBERED.search(p.name))
        for p in numbered[: max(len(numbered) - self.keep_last, 0)]:
            p.unlink(missing_ok=True)

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if self.period > 0 and completed % self.period == 0 and completed < self.trainer.max_iters:
            self.save(completed)

    def after_train(self) -> None:
        if self.trainer.failed:
            return
        completed = self.trainer.iter
        if completed != self.last_saved_iter:
            self.save(completed)


class BestCheckpointer(HookBase):
    """Writes ``checkpoints/best.pth`` when the eval metric improves (rank 0).

    ``best.pth`` holds the full training state, like ``last.pth`` (model, optimizer,
    scaler, scheduler, iteration, RNG states, EMA, config and the extra entries), at the
    evaluated iteration, plus ``metric``: ``{name: value}``. :func:`detkit.load_weights`
    takes the EMA weights from it when the run has EMA (those are what was evaluated).
    The RNG states are this process's only (the metric is known on rank 0 alone).

    Reads the metrics the :class:`~detkit.engine.hooks.EvalHook` just stored in
    ``trainer.storage`` (register it after the EvalHook). ``config``, ``scheduler_state``
    and ``extra`` default to those of a :class:`PeriodicCheckpointer` registered on the
    same trainer.
    """

    def __init__(self, checkpoint_dir: str | Path, metric: str = "bbox/AP", mode: str = "max",
                 config: Optional[dict] = None, scheduler_state: Optional[dict] = None,
                 extra: Optional[Callable[[int], dict]] = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.dir = Path(checkpoint_dir)
        self.metric = metric
        self.mode = mode
        self.config = config
        self.scheduler_state = scheduler_state
        self.extra = extra
        self.best: Optional[float] = None
        self._seen_iteration = -1

    def _periodic(self) -> Optional[PeriodicCheckpointer]:
        return next((h for h in self.trainer.hooks if isinstance(h, PeriodicCheckpointer)), None)

    def _state(self, completed: int, value: float) -> dict[str, Any]:
        t = self.trainer
        periodic = self._periodic()
        config = self.config if self.config is not None else (periodic.config if periodic else {})
        sched = self.scheduler_state if self.scheduler_state is not None else (
            periodic.scheduler_state if periodic else {})
        extra_fn = self.extra if self.extra is not None else (periodic.extra if periodic else None)
        extra = dict(extra_fn(completed)) if extra_fn is not None else {}
        extra["metric"] = {self.metric: value}
        return training_state(t.model, t.optimizer, completed, sched, t.scaler, t.ema, config,
                              [get_rng_state()], extra=extra)

    def _maybe_save(self) -> None:
        st = self.trainer.storage
        if st.eval_iteration == self._seen_iteration or self.metric not in st.eval_results:
            return
        self._seen_iteration = st.eval_iteration
        value = float(st.eval_results[self.metric])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if not better:
            return
        self.best = value
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self._state(st.eval_iteration, value), self.dir / "best.pth")
            logger.info("New best %s = %.3f at iteration %d: saved %s", self.metric, value,
                        st.eval_iteration, self.dir / "best.pth")

    def before_train(self) -> None:
        path = self.dir / "best.pth"
        if self.trainer.start_iter > 0 and path.is_file():  # resuming: keep beating the old best
            try:
                self.best = float(load_checkpoint(path).get("metric", {})[self.metric])
            except Exception:  # an unreadable best.pth is simply replaced
                self.best = None

    def after_step(self) -> None:
        self._maybe_save()

    def after_train(self) -> None:
        if not self.trainer.failed:
            self._maybe_save()
