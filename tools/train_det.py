#!/usr/bin/env python
"""Train a Faster / Mask R-CNN detector on COCO-format data.

Examples:
  # the demo: Mask R-CNN R18-FPN on the generated shapes set (minutes on a CPU) -> output/demo
  python tools/train_det.py --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml
  # your COCO-format data, a short schedule (train.steps, the LR drops, inside train.max_iters)
  python tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --output-dir runs/mine \\
      data.train.annotations=my/train.json data.train.images=my/images \\
      data.val.annotations=my/val.json data.val.images=my/images \\
      train.max_iters=5000 train.steps=[3500,4500] train.batch_size=4 train.base_lr=0.005
  # continue an interrupted run (its config.yaml points at its folder)
  python tools/train_det.py --config runs/mine/config.yaml --resume
  # COCO 2017 under datasets/coco, 8 GPUs
  torchrun --nproc_per_node 8 tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      --output-dir runs/coco_r50
  # then evaluate a checkpoint (writes runs/mine/eval/)
  python tools/eval_det.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth

Outputs in the output folder: config.yaml (the resolved config with the data's classes, category
ids and output_dir recorded: it alone rebuilds the model), log.txt, metrics.jsonl (one line per
logged iteration), metrics.json (final COCO metrics, percent), checkpoints/last.pth, best.pth and
the last numbered ones, TensorBoard events (``tensorboard --logdir OUTPUT_DIR``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from detkit.config import ConfigError, DetectionConfig, load_config, save_config
from detkit.engine import (
    BestCheckpointer,
    EvalHook,
    EvalMetricsWriter,
    HookBase,
    LRSchedule,
    LRScheduler,
    MetricsWriter,
    ModelEMA,
    PeriodicCheckpointer,
    ProgressBar,
    Trainer,
    VisualizationHook,
    build_sgd,
    restore_training_state,
)
from detkit.engine.detection import (
    DetectionData,
    build_model,
    build_train_loader,
    check_same_categories,
    eval_model,
    load_split,
    make_eval_fn,
    resolve_data_paths,
    resolve_num_classes,
    visualization_samples,
    write_metrics_json,
)
from detkit.engine.distributed import init_distributed, is_main_process, unwrap_model
from detkit.engine.launch import default_argument_parser, run_cli, seed_everything, setup_output_dir
from detkit.evaluation import format_coco_table, format_per_class_table

logger = logging.getLogger("detkit.train")


def load_detection_config(path: str, overrides: Sequence[str]) -> DetectionConfig:
    """The config plus overrides; it must be a detection config."""
    cfg = load_config(path, list(overrides))
    if not isinstance(cfg, DetectionConfig):
        raise ConfigError(f"{path}: this is a classification config; use tools/pretrain_cls.py")
    return cfg


def build_data(cfg: DetectionConfig) -> DetectionData:
    """Validated train and val splits (the val split is optional: no evaluation without it)."""
    train = load_split(cfg, "train", is_train=True)
    val = None
    if cfg.data.val.annotations or cfg.data.val.images:
        val = load_split(cfg, "val", is_train=False)
        check_same_categories(train, val)
    else:
        logger.warning("data.val is not set: training without evaluation")
    num_classes = resolve_num_classes(cfg, train)
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


def maybe_resume(resume: bool, out: Path, trainer: Trainer) -> int:
    """Restore ``checkpoints/last.pth`` into the trainer when ``--resume``; returns the start iteration."""
    last = out / "checkpoints" / "last.pth"
    if not resume:
        return 0
    if not last.is_file():
        logger.warning("--resume: %s not found; starting from scratch", last)
        return 0
    ckpt = restore_training_state(last, trainer.model, trainer.optimizer, trainer.scaler, trainer.ema)
    logger.info("Resumed from %s at iteration %d", last, ckpt["iteration"])
    return int(ckpt["iteration"])


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


def report(out: Path, metrics: dict[str, float]) -> None:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__).parse_args(argv)
    cfg = load_detection_config(args.config, args.overrides)
    device = init_distributed()
    out = setup_output_dir(cfg, args.output_dir)
    seed_everything(cfg.train.seed)
    cfg = resolve_data_paths(cfg)
    data = build_data(cfg)
    cfg = record_classes(cfg, data, out)

    model = build_model(cfg, data.num_classes, device)
    ema = ModelEMA(unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema else None
    trainer = Trainer(model, build_optimizer(cfg, model), [], cfg.train.max_iters, device=device,
                      amp=cfg.train.amp, clip_grad_norm=cfg.train.clip_grad_norm, ema=ema)
    trainer.start_iter = trainer.iter = maybe_resume(args.resume, out, trainer)
    trainer.data_loader = build_train_loader(cfg, data.train, trainer.start_iter)
    trainer.register_hooks(build_hooks(cfg, out, trainer, data, device))
    try:
        trainer.train()
    except FloatingPointError as e:
        last = out / "checkpoints" / "last.pth"
        kept = f"last good checkpoint kept: {last}" if last.is_file() else "no checkpoint was written yet"
        raise FloatingPointError(f"{e}; {kept}") from None

    report(out, trainer.storage.eval_results)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
