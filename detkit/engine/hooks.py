"""Training hooks: LR schedule, periodic evaluation, logging (text, JSON lines, TensorBoard), progress bar.

Checkpointing hooks live in :mod:`detkit.engine.checkpointing`. Recommended order:
``LRScheduler, MetricsWriter, PeriodicCheckpointer, EvalHook, BestCheckpointer,
VisualizationHook, EvalMetricsWriter, ProgressBar``: an iteration is logged before its
checkpoint is written (so a run killed right after a checkpoint and resumed from it
has no gap in ``metrics.jsonl``), the checkpoint is written before an evaluation that
could fail, the best checkpoint sees the fresh metrics, and the TensorBoard writer is
closed last.
"""

from __future__ import annotations

import json
import math
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .distributed import is_main_process
from .lr_schedule import LRSchedule
from .optim import set_lr
from .trainer import HookBase

__all__ = [
    "LRScheduler",
    "EvalHook",
    "MetricsWriter",
    "EvalMetricsWriter",
    "ProgressBar",
    "VisualizationHook",
    "truncate_jsonl",
]

logger = logging.getLogger("detkit.engine")


class LRScheduler(HookBase):
    """Sets every param group's lr to ``base_lr * schedule(iteration)`` before each step."""

    def __init__(self, schedule: LRSchedule | Callable[[int], float]) -> None:
        self.schedule = schedule

    def before_step(self) -> None:
        lr = set_lr(self.trainer.optimizer, self.schedule(self.trainer.iter))
        self.trainer.storage.put_scalar("lr", lr)


class EvalHook(HookBase):
    """Runs ``eval_fn() -> metrics`` every ``period`` iterations and once at the end.

    ``period`` 0 evaluates only at the end. ``eval_fn`` is called on every process
    (data-parallel inference) and returns the metrics on rank 0 (may be empty
    elsewhere). Results are put in ``trainer.storage`` for later hooks.
    """

    def __init__(self, period: int, eval_fn: Callable[[], dict[str, float]]) -> None:
        self.period = int(period)
        self.eval_fn = eval_fn

    def _run(self, completed: int) -> None:
        t0 = time.perf_counter()
        metrics = self.eval_fn() or {}
        self.trainer.model.train()
        self.trainer.storage.put_eval(metrics, completed)
        if metrics:
            main = {k: round(v, 3) for k, v in metrics.items() if k.count("/") == 1 and k.endswith("/AP")}
            logger.info("Evaluation at iteration %d took %.1fs: %s", completed, time.perf_counter() - t0,
                        main or dict(list(metrics.items())[:4]))

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if self.period > 0 and completed % self.period == 0 and completed < self.trainer.max_iters:
            self._run(completed)

    def after_train(self) -> None:
        if not self.trainer.failed and self.trainer.iter >= self.trainer.max_iters:
            self._run(self.trainer.max_iters)


def truncate_jsonl(path: Path, max_iter: int) -> None:
    """Drop lines of a metrics.jsonl whose ``iter`` is beyond ``max_iter`` (resume after a crash)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("iter", -1)) <= max_iter:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    path.write_text("".join(s + "\n" for s in keep), encoding="utf-8")


class MetricsWriter(HookBase):
    """Every ``period`` iterations (and the last): a log line, a ``metrics.jsonl`` line, TensorBoard scalars.

    The JSON line holds ``iter`` (completed iterations), ``lr``, every loss,
    ``total_loss`` (medians over the period), ``time``, ``data_time`` (seconds per
    iteration), ``eta_seconds``, ``skipped_images`` (so far) and ``elapsed_seconds`` (wall time since this
    process started training, evaluations included). After each evaluation, a line
    ``{"iter": N, "bbox/AP": ..., ...}`` with the summary metrics (no per-class AP) is added, and
    all metrics go to TensorBoard under their own names. Only rank 0 writes.
    """

    def __init__(self, output_dir: str | Path, period: int = 20, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.period = max(int(period), 1)
        self.use_tb = tensorboard
        self.tb: Any = None
        self._jsonl: Any = None
        self._last_eval_iter = -1
        self._t_start = 0.0

    def before_train(self) -> None:
        self._t_start = time.perf_counter()
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.output_dir / "metrics.jsonl"
        if self.trainer.start_iter > 0:
            truncate_jsonl(jsonl, self.trainer.start_iter)
        elif jsonl.exists():
            jsonl.unlink()
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.output_dir), purge_step=self.trainer.start_iter + 1)

    def _write_iteration(self, completed: int) -> None:
        st = self.trainer.storage
        window = min(self.period, st.window)
        names = sorted(k for k in st.latest if k.startswith("loss") or k == "total_loss")
        record: dict[str, Any] = {"iter": completed}
        if "lr" in st.latest:
            record["lr"] = st.latest["lr"][0]
        for k in names:
            record[k] = st.median(k, window)
        step_time = st.avg("time", window) if "time" in st.latest else 0.0
        record["time"] = step_time
        record["data_time"] = st.avg("data_time", window) if "data_time" in st.latest else 0.0
        record["eta_seconds"] = step_time * (self.trainer.max_iters - completed)
        record["skipped_images"] = st.skipped_images
        record["elapsed_seconds"] = round(time.perf_counter() - self._t_start, 3)  # since this process started
        if not is_main_process():
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k if k in ("lr", "total_loss") else f"train/{k}", v, completed)
        losses = "  ".join(f"{k}: {record[k]:.4f}" for k in names)
        logger.info(
            "iter: %d/%d  %s  lr: %.3g  time: %.3fs  data_time: %.3fs  eta: %s%s",
            completed, self.trainer.max_iters, losses, record.get("lr", 0.0), step_time,
            record["data_time"], _fmt_seconds(record["eta_seconds"]),
            f"  skipped images: {st.skipped_images}" if st.skipped_images else "",
        )

    def write_eval(self) -> None:
        """Send the newest evaluation metrics (if not sent yet) to TensorBoard (rank 0)."""
        if not is_main_process():
            return
        st = self.trainer.storage
        if st.eval_iteration == self._last_eval_iter or not st.eval_results:
            return
        self._last_eval_iter = st.eval_iteration
        if self._jsonl is not None:  # the eval history next to the losses (tools/analyze.py log plots it)
            summary = {k: (None if math.isnan(v) else v) for k, v in st.eval_results.items()
                       if isinstance(v, (int, float)) and "/AP-" not in k}  # NaN -> null: strict JSON
            elapsed = round(time.perf_counter() - self._t_start, 3)
            self._jsonl.write(json.dumps({"iter": st.eval_iteration, "elapsed_seconds": elapsed, **summary}) + "\n")
            self._jsonl.flush()
        if self.tb is not None:
            for k, v in st.eval_results.items():
                if not isinstance(v, (int, float)):
                    continue
                iou_type, _, name = k.partition("/")
                if name.startswith("AP-"):  # per-class AP in its own section
                    k = f"{iou_type}_per_class/{name[3:]}"
                self.tb.add_scalar(k, v, st.eval_iteration)
            self.tb.flush()

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if completed % self.period == 0 or completed == self.trainer.max_iters:
            self._write_iteration(completed)
        self.write_eval()

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard writer."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def after_train(self) -> None:
        """Summary lines; the files stay open for later hooks until :class:`EvalMetricsWriter` closes them."""
        if is_main_process():
            if self.trainer.storage.skipped_images:
                logger.warning("%d unreadable images were skipped during training",
                               self.trainer.storage.skipped_images)
            total = time.perf_counter() - self._t_start
            done = max(self.trainer.iter - self.trainer.start_iter, 0)
            logger.info("Trained %d iterations in %s (%.2f s/it)", done, _fmt_seconds(total),
                        total / max(done, 1))
        if self._jsonl is not None:
            self._jsonl.flush()


class EvalMetricsWriter(HookBase):
    """Registered after the evaluation hooks: sends fresh eval metrics to the :class:`MetricsWriter`'s
    TensorBoard right after each evaluation, and closes the writer at the end of training."""

    def __init__(self, writer: MetricsWriter) -> None:
        self.writer = writer

    def after_step(self) -> None:
        self.writer.write_eval()

    def after_train(self) -> None:
        try:
            self.writer.write_eval()
        finally:
            self.writer.close()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _short_loss_name(name: str) -> str:
    """``loss_rpn_cls`` -> ``rpn_cls`` (progress bar labels)."""
    return name[len("loss_"):] if name.startswith("loss_") and len(name) > len("loss_") else name


class ProgressBar(HookBase):
    """A tqdm bar on rank 0 with ETA, it/s, total loss, each loss (short names, e.g. ``rpn_cls``) and lr.

    Losses are medians of the last 5 iterations, like the total."""

    def __init__(self, refresh_period: int = 1) -> None:
        self.refresh_period = max(refresh_period, 1)
        self.bar: Any = None

    def before_train(self) -> None:
        if not is_main_process():
            return
        from tqdm.auto import tqdm

        t = self.trainer
        self.bar = tqdm(total=t.max_iters, initial=t.start_iter, desc="train", unit="it",
                        dynamic_ncols=True, mininterval=0.5)

    def after_step(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        completed = self.trainer.iter + 1
        if completed % self.refresh_period == 0:
            st = self.trainer.storage
            post = {}
            if "total_loss" in st.latest:
                post["loss"] = f"{st.median('total_loss', 5):.3f}"
            for k in sorted(k for k in st.latest if k.startswith("loss") and k != "loss"):
                post.setdefault(_short_loss_name(k), f"{st.median(k, 5):.3f}")
            if "lr" in st.latest:
                post["lr"] = f"{st.latest['lr'][0]:.2e}"
            self.bar.set_postfix(post, refresh=False)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class VisualizationHook(HookBase):
    """Draws a few validation images, ground truth beside predictions, into TensorBoard and, at the
    end of training, into PNG files.

    Args:
        writer: the :class:`MetricsWriter` whose SummaryWriter is used.
        samples: ``(image [3,H,W] RGB 0..255, Targets)`` pairs, already resized for the model.
        class_names: for labels on the drawings.
        period: every ``period`` iterations; 0 only at the end.
        score_threshold: predictions drawn above this score.
        image_dir: where the final drawings go as ``val_<i>.png`` ([ground truth | predictions]);
            None writes no files.
    """

    def __init__(self, writer: MetricsWriter, samples: Sequence[tuple[torch.Tensor, Any]],
                 class_names: Sequence[str], period: int = 0, score_threshold: float = 0.3,
                 image_dir: Optional[Path] = None) -> None:
        self.writer = writer
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.period = int(period)
        self.score_threshold = score_threshold
        self.image_dir = Path(image_dir) if image_dir is not None else None

    def _run(self, completed: int, write_files: bool = False) -> None:
        write_files = write_files and self.image_dir is not None
        if not is_main_process() or not self.samples or (self.writer.tb is None and not write_files):
            return
        from ..visualization import draw_detections_struct, draw_targets
        from .distributed import unwrap_model

        t = self.trainer
        model = unwrap_model(t.ema.module if t.ema is not None else t.model)
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            images = [im.to(t.device) for im, _ in self.samples]
            dets = model.predict(images, paste_masks=True)
        model.train(was_training)
        for i, ((img, tgt), det) in enumerate(zip(self.samples, dets)):
            # (3, H, W) 0..255 -> (H, W, 3) uint8 RGB
            rgb = img.detach().to("cpu").float().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            gt = draw_targets(rgb, tgt, self.class_names)
            pred = draw_detections_struct(rgb, det.to("cpu"), self.class_names, self.score_threshold)
            sep = np.full((rgb.shape[0], 4, 3), 255, dtype=np.uint8)
            canvas = np.concatenate([gt, sep, pred], axis=1)  # [ground truth | predictions]
            if self.writer.tb is not None:
                self.writer.tb.add_image(f"val/{i}", canvas, completed, dataformats="HWC")
            if write_files:
                import cv2

                self.image_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                cv2.imwrite(str(self.image_dir / f"val_{i}.png"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if self.writer.tb is not None:
            self.writer.tb.flush()

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if self.period > 0 and completed % self.period == 0 and completed < self.trainer.max_iters:
            self._run(completed)

    def after_train(self) -> None:
        if not self.trainer.failed and self.trainer.iter >= self.trainer.max_iters:
            try:
                self._run(self.trainer.max_iters, write_files=True)
            except Exception as e:  # drawings are a convenience: never fail a finished run for them
                logger.warning("could not draw the validation images: %s", e)
