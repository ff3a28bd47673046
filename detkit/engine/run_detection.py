"""Whole detection runs: :func:`train_detection` (``tools/train_det.py``) and :func:`evaluate_detection`
(``tools/eval_det.py``). The tools only parse arguments and call these; tests call them directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..checkpoint import load_initial_weights
from ..config import DetectionConfig, save_config
from ..data.classes import resolve_classes
from ..data.coco import load_coco
from ..evaluation import format_coco_table, format_per_class_table
from ..models.build import build_detector
from .checkpointing import BestCheckpointer, PeriodicCheckpointer, resume_from_last
from .detection import (
    DetectionData,
    build_evaluator,
    build_model,
    build_test_loader,
    build_train_loader,
    check_same_categories,
    eval_model,
    load_split,
    make_eval_fn,
    resolve_data_paths,
    visualization_samples,
    write_metrics_json,
)
from .distributed import init_distributed, is_main_process, unwrap_model
from .ema import ModelEMA
from .hooks import EvalHook, EvalMetricsWriter, LRScheduler, MetricsWriter, ProgressBar, VisualizationHook
from .evaluate import inference_on_dataset
from .launch import seed_everything, setup_output_dir
from .lr_schedule import LRSchedule
from .optim import build_sgd
from .trainer import HookBase, Trainer

__all__ = ["train_detection", "evaluate_detection"]

logger = logging.getLogger("detkit.train")

PathLike = Union[str, Path]


def build_data(cfg: DetectionConfig) -> DetectionData:
    """Validated train and val splits (the val split is optional: no evaluation without it)."""
    train = load_split(cfg, "train", is_train=True)
    val = None
    if cfg.data.val.annotations or cfg.data.val.images:
        val = load_split(cfg, "val", is_train=False)
        if len(train.sets) > 1 and set(val.class_names) == set(train.class_names):  # labels in training's order
            val = load_coco(cfg.data.val.annotations, cfg.data.val.images, filter_empty=False, is_train=False,
                            class_names=train.class_names)
        check_same_categories(train, val)
    else:
        logger.warning("data.val is not set: training without evaluation")
    num_classes = resolve_classes(cfg, train).num_classes
    logger.info("%d classes; %d training images%s", num_classes, len(train),
                f", {len(val)} validation images" if val is not None else "")
    return DetectionData(train, val, num_classes)


def record_classes(cfg: DetectionConfig, data: DetectionData, out: Path) -> DetectionConfig:
    """Store the data's class count, names and category ids and the output folder in the config and
    rewrite ``config.yaml``, so the saved config alone rebuilds the model
    (``detkit.Predictor(out / "config.yaml")``), tools can write COCO ``category_id`` s without the
    annotations file, and ``--config out/config.yaml`` (``--resume``, eval_det) finds the run."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.num_classes = data.num_classes
    cfg.data.class_names = list(data.train.class_names)
    cfg.data.category_ids = [int(c) for c in data.train.category_ids]  # contiguous label i -> category id
    cfg.output_dir = str(out)
    if is_main_process():
        save_config(cfg, out / "config.yaml")
    return cfg


def build_optimizer(cfg: DetectionConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    return build_sgd(model, t.base_lr, t.momentum, t.weight_decay, t.weight_decay_norm, t.weight_decay_bias)


def build_schedule(cfg: DetectionConfig) -> LRSchedule:
    t = cfg.train
    return LRSchedule(t.max_iters, t.lr_schedule, t.steps, t.gamma, t.warmup_iters, t.warmup_factor)


def build_hooks(cfg: DetectionConfig, out: Path, trainer: Trainer, data: DetectionData,
                device: torch.device) -> list[HookBase]:
    """LR schedule, checkpoints, evaluation, best checkpoint, TensorBoard images, logs, progress bar."""
    t = cfg.train
    config_dict = cfg.model_dump(mode="json")
    schedule = build_schedule(cfg)
    writer = MetricsWriter(out, t.log_period)
    hooks: list[HookBase] = [
        LRScheduler(schedule),
        writer,  # logs an iteration before its checkpoint is written (see detkit.engine.hooks)
        PeriodicCheckpointer(out / "checkpoints", t.checkpoint_period, t.keep_last, config_dict,
                             schedule.state_dict()),
    ]
    if data.val is not None:
        eval_fn = make_eval_fn(cfg, data.val, lambda: eval_model(trainer.model, trainer.ema), device)
        hooks.append(EvalHook(t.eval_period, eval_fn))
        hooks.append(BestCheckpointer(out / "checkpoints", "bbox/AP", config=config_dict))
        samples = visualization_samples(cfg, data.val, t.num_vis_images)
        if samples:
            hooks.append(VisualizationHook(writer, samples, data.class_names, t.vis_period, image_dir=out / "vis"))
    hooks += [EvalMetricsWriter(writer), ProgressBar()]
    return hooks


def print_training_report(out: Path, metrics: dict[str, float]) -> None:
    """Write metrics.json and print the COCO tables and where everything is (rank 0)."""
    if not is_main_process():
        return
    if metrics:
        write_metrics_json(out / "metrics.json", metrics)
        print(format_coco_table(metrics))
        print(format_per_class_table(metrics))
    print(f"\nOutputs in {out}: metrics.json, metrics.jsonl, log.txt, config.yaml, checkpoints/ (last.pth, best.pth)")
    vis = sorted((out / "vis").glob("val_*.png"))
    if vis:
        print(f"Predictions drawn on {len(vis)} validation image(s) ([ground truth | predictions]): {out / 'vis'}/")
    print(f"TensorBoard (losses, lr, AP, predictions): tensorboard --logdir {out}   then open http://localhost:6006")


def train_detection(cfg: DetectionConfig, output_dir: Optional[PathLike] = None, resume: bool = False
                    ) -> dict[str, float]:
    """Train ``cfg`` (under torchrun: on every process) and return the final COCO metrics (percent).

    Writes the outputs that ``tools/train_det.py`` documents into ``output_dir`` (default
    ``cfg.output_dir``); ``resume`` continues from its ``checkpoints/last.pth``.
    """
    device = init_distributed()
    out = setup_output_dir(cfg, output_dir)
    seed_everything(cfg.train.seed)
    cfg = resolve_data_paths(cfg)
    data = build_data(cfg)
    cfg = record_classes(cfg, data, out)

    model = build_model(cfg, data.num_classes, device)
    ema = ModelEMA(unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema else None
    trainer = Trainer(model, build_optimizer(cfg, model), [], cfg.train.max_iters, device=device,
                      amp=cfg.train.amp, clip_grad_norm=cfg.train.clip_grad_norm, ema=ema)
    ckpt = resume_from_last(out, trainer.model, trainer.optimizer, trainer.scaler, trainer.ema) if resume else None
    trainer.start_iter = trainer.iter = int(ckpt["iteration"]) if ckpt else 0
    trainer.data_loader = build_train_loader(cfg, data.train, trainer.start_iter)
    trainer.register_hooks(build_hooks(cfg, out, trainer, data, device))
    try:
        trainer.train()
    except FloatingPointError as e:
        last = out / "checkpoints" / "last.pth"
        kept = f"last good checkpoint kept: {last}" if last.is_file() else "no checkpoint was written yet"
        raise FloatingPointError(f"{e}; {kept}") from None
    print_training_report(out, trainer.storage.eval_results)
    return dict(trainer.storage.eval_results)


def evaluate_detection(cfg: DetectionConfig, weights: PathLike, output_dir: Optional[PathLike] = None
                       ) -> dict[str, float]:
    """COCO metrics (percent) of ``weights`` on ``data.val``, with the model :class:`detkit.Predictor` runs.

    Writes ``eval_config.yaml``, ``results.json`` and ``metrics.json`` into ``output_dir`` (default
    ``cfg.output_dir/eval``) and prints the tables (rank 0).
    """
    cfg = cfg.model_copy(deep=True)  # eval_config.yaml records the weights evaluated
    cfg.model.weights, cfg.model.backbone.weights = str(weights) if isinstance(weights, (str, Path)) else None, None
    device = init_distributed()
    out = setup_output_dir(cfg, output_dir, config_name="eval_config.yaml", default_subdir="eval")
    cfg = resolve_data_paths(cfg)
    if cfg.test.precision == "int8" and not cfg.test.int8_quantized and not (
            cfg.data.train.annotations and cfg.data.train.images):
        raise ValueError("test.precision=int8 calibrates on data.train, which is not set: set "
                         "data.train.annotations and data.train.images, or test.int8_quantized=FOLDER "
                         "(tools/quantize.py)")
    val = load_split(cfg, "val", is_train=False)
    model = build_detector(cfg, resolve_classes(cfg, val).num_classes)
    load_initial_weights(model, cfg, weights, training=False)
    model = model.to(device).eval()

    evaluator = build_evaluator(cfg, val)
    metrics = inference_on_dataset(model, build_test_loader(cfg, val), evaluator, cfg.test.precision, device,
                                   optimize=True, config=cfg)  # the model detkit.Predictor runs
    if is_main_process():
        evaluator.write_results(out / "results.json")
        write_metrics_json(out / "metrics.json", metrics)
        print(format_coco_table(metrics))
        print(format_per_class_table(metrics))
        print(f"\nWrote {Path(out) / 'metrics.json'} and {Path(out) / 'results.json'}")
    return metrics
