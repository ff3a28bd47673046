"""A whole classification pretraining run: :func:`pretrain_classifier` (``tools/pretrain_cls.py``).

The tool only parses arguments and calls it; tests call it directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..checkpoint import load_initial_weights
from ..config import ClassificationConfig
from ..data.coco import DatasetError
from ..fileio import write_json_atomic
from ..models import build_classifier
from .checkpointing import PeriodicCheckpointer, resume_from_last
from .classification import EpochBatches, EpochEndHook, build_classification_datasets, build_val_loader
from .distributed import batch_size_per_process, get_world_size, init_distributed, is_main_process
from .hooks import EvalMetricsWriter, LRScheduler, MetricsWriter, ProgressBar
from .launch import seed_everything, setup_output_dir
from .lr_schedule import LRSchedule
from .optim import build_adamw, build_sgd
from .trainer import Trainer

__all__ = ["pretrain_classifier"]

logger = logging.getLogger("detkit.pretrain")

PathLike = Union[str, Path]


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
    norm = cfg.model.norm
    if norm == "SyncBN" and (get_world_size() == 1 or device.type == "cpu"):
        norm = "BN"  # one process: SyncBN equals BN; CPU: torch's SyncBatchNorm has no CPU kernel
    model = build_classifier(cfg.model.arch, num_classes, norm=norm, zero_init_residual=cfg.model.zero_init_residual,
                             shortcut=cfg.model.shortcut)
    load_initial_weights(model, cfg, training=True)
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


def write_metrics(out: Path, history: list[dict]) -> dict:
    """metrics.json: the last epoch's top1/top5 (percent) plus its epoch, loss and skipped-image count."""
    if not history:
        return {}
    last = history[-1]
    metrics = {"top1": last["top1"], "top5": last["top5"], "epoch": last["epoch"],
               "train_loss": last["train_loss"], "best_top1": max(h["top1"] for h in history),
               "skipped_images": sum(h.get("skipped_images", 0) for h in history)}
    if is_main_process():
        write_json_atomic(out / "metrics.json", metrics, indent=2)
    return metrics


def pretrain_classifier(cfg: ClassificationConfig, output_dir: Optional[PathLike] = None, resume: bool = False
                        ) -> dict:
    """Train the classifier of ``cfg`` (under torchrun: on every process) and return its metrics.json
    content (top1/top5 in percent, ...). ``resume`` continues from ``output_dir/checkpoints/last.pth``.
    """
    device = init_distributed()
    out = setup_output_dir(cfg, output_dir)
    seed_everything(cfg.train.seed)
    train_ds, val_ds = build_classification_datasets(cfg, cfg.train.seed)
    num_classes = resolve_num_classes(cfg, train_ds.classes)
    logger.info("%d classes, %d training and %d validation images", num_classes, len(train_ds), len(val_ds))

    bpp = batch_size_per_process(cfg.train.batch_size)
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
    ckpt = resume_from_last(out, model, optimizer, trainer.scaler) if resume else None
    start_epoch, history = (int(ckpt.get("epoch", 0)), list(ckpt.get("history", []))) if ckpt else (0, [])
    if ckpt:
        logger.info("Resumed from %s: %d epoch(s) done", out / "checkpoints" / "last.pth", start_epoch)
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
    return metrics
