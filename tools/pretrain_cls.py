#!/usr/bin/env python
"""Pretrain a ResNet classifier on an ImageFolder (to initialize detector backbones).

Examples:
  # the demo: ResNet-18 on the generated shapes ImageFolder (a few minutes on a CPU)
  python tools/pretrain_cls.py --config configs/classification/shapes_resnet18.yaml
  # ResNet-50 on ImageNet-style folders (<root>/<class>/<image>)
  python tools/pretrain_cls.py --config configs/classification/resnet50_imagefolder.yaml \\
      --output-dir runs/r50 data.train=/data/imagenet/train data.val=/data/imagenet/val
  # continue an interrupted run (its config.yaml points at its folder)
  python tools/pretrain_cls.py --config runs/r50/config.yaml --resume
  # 8 GPUs (train.batch_size is the total over the processes)
  torchrun --nproc_per_node 8 tools/pretrain_cls.py --config configs/classification/resnet50_imagefolder.yaml \\
      --output-dir runs/r50 data.train=/data/imagenet/train data.val=/data/imagenet/val
  # then initialize a detector's backbone with it
  python tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      model.backbone.weights=runs/r50/checkpoints/last.pth

Outputs in the output folder: config.yaml, log.txt, metrics.jsonl, metrics.json (top1/top5 in
percent), checkpoints/last.pth (written after every epoch; use it as ``model.backbone.weights``
of a detection config), TensorBoard events.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from detkit.config import ClassificationConfig, ConfigError, load_config
from detkit.data.coco import DatasetError
from detkit.engine import (
    EvalMetricsWriter,
    LRSchedule,
    LRScheduler,
    MetricsWriter,
    PeriodicCheckpointer,
    ProgressBar,
    Trainer,
    build_adamw,
    build_sgd,
    restore_training_state,
)
from detkit.engine.classification import EpochBatches, EpochEndHook, build_classification_datasets, build_val_loader
from detkit.engine.distributed import get_world_size, init_distributed, is_main_process
from detkit.engine.launch import default_argument_parser, run_cli, seed_everything, setup_output_dir

logger = logging.getLogger("detkit.pretrain")


def load_classification_config(args) -> ClassificationConfig:
    """The config file plus overrides; it must be a classification config."""
    cfg = load_config(args.config, args.overrides)
    if not isinstance(cfg, ClassificationConfig):
        raise ConfigError(f"{args.config}: this is a detection config (task: detection); "
                          "use tools/train_det.py, or set task: classification")
    return cfg


def resolve_num_classes(cfg: ClassificationConfig, classes: list[str]) -> int:
    """Number of class folders; ``model.num_classes`` may only confirm it."""
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise DatasetError(
            f"model.num_classes={cfg.model.num_classes} but the training folder has {len(classes)} class "
            f"folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); remove model.num_classes "
            "or fix the folders"
        )
    return len(classes)


def build_model(cfg: ClassificationConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The classifier on ``device`` (optionally initialized from ``model.weights``), DDP-wrapped when distributed."""
    from detkit.checkpoint import load_weights
    from detkit.models import build_classifier

    norm = cfg.model.norm
    if norm == "SyncBN" and (get_world_size() == 1 or device.type == "cpu"):
        norm = "BN"  # one process: SyncBN equals BN; CPU: torch's SyncBatchNorm has no CPU kernel
    model = build_classifier(cfg.model.arch, num_classes, norm=norm, zero_init_residual=cfg.model.zero_init_residual,
                             shortcut=cfg.model.shortcut)
    if cfg.model.weights:
        logger.info("Initializing from model.weights:\n%s", load_weights(model, cfg.model.weights).summary())
    model.to(device)
    if get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


def build_optimizer(cfg: ClassificationConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (no decay on norm parameters) or AdamW (no decay on norms and biases)."""
    t = cfg.train
    if t.optimizer == "adamw":
        return build_adamw(model, t.base_lr, weight_decay=t.weight_decay)
    return build_sgd(model, t.base_lr, momentum=t.momentum, weight_decay=t.weight_decay, weight_decay_norm=0.0)


def batch_size_per_process(cfg: ClassificationConfig) -> int:
    world = get_world_size()
    if cfg.train.batch_size % world != 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (total) is not divisible by the "
                          f"{world} processes; pick a multiple of {world}")
    return cfg.train.batch_size // world


def maybe_resume(args, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_scaler) -> tuple[int, list]:
    """(completed epochs, epoch history) from ``checkpoints/last.pth`` when --resume, else (0, [])."""
    last = out / "checkpoints" / "last.pth"
    if not args.resume:
        return 0, []
    if not last.is_file():
        logger.warning("--resume: %s not found; starting from scratch", last)
        return 0, []
    ckpt = restore_training_state(last, model, optimizer, trainer_scaler)
    epoch = int(ckpt.get("epoch", 0))
    logger.info("Resumed from %s: %d epoch(s) done", last, epoch)
    return epoch, list(ckpt.get("history", []))


def write_metrics(out: Path, history: list[dict]) -> dict:
    """metrics.json: the last epoch's top1/top5 (percent) plus its epoch, loss and skipped-image count."""
    if not history:
        return {}
    last = history[-1]
    metrics = {"top1": last["top1"], "top5": last["top5"], "epoch": last["epoch"],
               "train_loss": last["train_loss"], "best_top1": max(h["top1"] for h in history),
               "skipped_images": sum(h.get("skipped_images", 0) for h in history)}
    if is_main_process():
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        tmp.replace(out / "metrics.json")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__).parse_args(argv)
    cfg = load_classification_config(args)
    device = init_distributed()
    out = setup_output_dir(cfg, args.output_dir)
    seed_everything(cfg.train.seed)
    train_ds, val_ds = build_classification_datasets(cfg, cfg.train.seed)
    num_classes = resolve_num_classes(cfg, train_ds.classes)
    logger.info("%d classes, %d training and %d validation images", num_classes, len(train_ds), len(val_ds))

    bpp = batch_size_per_process(cfg)
    model = build_model(cfg, num_classes, device)
    optimizer = build_optimizer(cfg, model)
    train_batches = EpochBatches(train_ds, bpp, cfg.dataloader.num_workers, cfg.train.seed)
    ipe = train_batches.iters_per_epoch
    t = cfg.train
    max_iters = t.max_iters or t.epochs * ipe
    num_epochs = -(-max_iters // ipe)  # the last one may be partial with train.max_iters
    schedule = LRSchedule(max_iters, t.lr_schedule, t.steps, t.gamma,
                          warmup_iters=int(round(t.warmup_epochs * ipe)), warmup_factor=0.01)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        return {"loss_cls": criterion(net(batch.images).float(), batch.labels)}

    trainer = Trainer(model, optimizer, train_batches, max_iters, device=device, amp=cfg.train.amp, loss_fn=loss_fn)
    start_epoch, history = maybe_resume(args, out, model, optimizer, trainer.scaler)
    trainer.start_iter = trainer.iter = min(start_epoch * ipe, max_iters)
    train_batches.epoch = start_epoch

    writer = MetricsWriter(out, cfg.train.log_period)
    epoch_hook = EpochEndHook(ipe, num_epochs, build_val_loader(val_ds, bpp, cfg.dataloader.num_workers),
                              writer, amp=trainer.amp, max_iters=max_iters)
    epoch_hook.history = history
    config_dict = cfg.model_dump(mode="json")
    checkpointer = PeriodicCheckpointer(
        out / "checkpoints", ipe, keep_last=0, config=config_dict, scheduler_state=schedule.state_dict(),
        extra=lambda it: {"epoch": it // ipe, "iters_per_epoch": ipe, "classes": list(train_ds.classes),
                          "history": list(epoch_hook.history)},
    )
    trainer.register_hooks([LRScheduler(schedule), writer, epoch_hook, checkpointer, EvalMetricsWriter(writer),
                            ProgressBar()])
    trainer.train()

    metrics = write_metrics(out, epoch_hook.history)
    if is_main_process():
        print(f"top1 {metrics.get('top1', float('nan')):.2f}%  top5 {metrics.get('top5', float('nan')):.2f}%  "
              f"after {metrics.get('epoch', 0)} epochs")
        print(f"outputs in {out}: metrics.json, log.txt, checkpoints/last.pth "
              f"(use it as model.backbone.weights); TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
