"""Pieces of classification pretraining (``tools/pretrain_cls.py``) on top of the iteration Trainer.

Pretraining is epoch-based, expressed as an iteration loop: ``iters_per_epoch``
batches make an epoch, :class:`EpochBatches` yields them epoch after epoch
(reshuffled per epoch, sharded over processes), and :class:`EpochEndHook`
evaluates top-1/top-5 on the validation set after each epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import ClassificationConfig
from ..data.coco import DatasetError
from ..data.imagefolder import ImageFolderDataset, check_class_sets, collate_classification
from ..data.samplers import InferenceSampler, worker_init_fn
from ..data.transforms import build_classification_transform
from ..evaluation.classification import ClassificationMeter
from .distributed import barrier, broadcast_buffers, get_rank, get_world_size, is_main_process, reduce_dict, unwrap_model
from .trainer import HookBase, autocast_context

__all__ = [
    "ClsBatch",
    "collate_cls_batch",
    "resolve_imagefolder_splits",
    "build_classification_datasets",
    "EpochBatches",
    "build_val_loader",
    "evaluate_classifier",
    "EpochEndHook",
]

logger = logging.getLogger("detkit.engine")


@dataclass
class ClsBatch:
    """A classification batch: normalized images [N,3,S,S], labels [N], unreadable files."""

    images: Tensor
    labels: Tensor
    skipped: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "ClsBatch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       labels=self.labels.to(device, non_blocking=True))


def collate_cls_batch(samples: list) -> ClsBatch:
    """:func:`~detkit.data.imagefolder.collate_classification` into a :class:`ClsBatch`."""
    images, labels, skipped = collate_classification(samples)
    return ClsBatch(images, labels, skipped)


def resolve_imagefolder_splits(cfg: ClassificationConfig) -> tuple[str, str]:
    """The train and val ImageFolder roots; generates the synthetic shapes set when configured.

    Raises:
        DatasetError: a split is unset and no synthetic data is configured.
    """
    train, val = cfg.data.train, cfg.data.val
    if cfg.data.synthetic is not None and train is None and val is None:
        from ..data.synthetic import make_shapes_imagefolder

        s = cfg.data.synthetic  # for classification num_train/num_val count images per class
        kwargs = dict(num_per_class_train=s.num_train, num_per_class_val=s.num_val,
                      image_size=s.image_size, seed=s.seed)
        if is_main_process():  # generate once; the other processes then reuse it
            make_shapes_imagefolder(s.root, **kwargs)
        barrier()
        paths = make_shapes_imagefolder(s.root, **kwargs)
        train, val = paths["train"], paths["val"]
    for key, value in (("data.train", train), ("data.val", val)):
        if not value:
            raise DatasetError(
                f"{key} is not set: give an ImageFolder root (<root>/<class>/<image>), "
                f"e.g. {key}=path/to/{key.split('.')[1]}"
            )
    return str(train), str(val)


def build_classification_datasets(cfg: ClassificationConfig, seed: int) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and val :class:`ImageFolderDataset` with their transforms; class sets must agree."""
    train_root, val_root = resolve_imagefolder_splits(cfg)
    train = ImageFolderDataset(train_root, build_classification_transform(cfg.input, True, seed=seed))
    val = ImageFolderDataset(val_root, build_classification_transform(cfg.input, False))
    check_class_sets(train, val)
    return train, val


class EpochBatches:
    """Batches of ``dataset`` epoch after epoch, starting at ``start_epoch``, for this process.

    Each epoch reshuffles with ``seed + epoch`` (a DistributedSampler, so processes get
    disjoint shards) and has exactly :attr:`iters_per_epoch` batches (the last
    incomplete batch is dropped when the epoch has at least one full batch).
    """

    def __init__(self, dataset: Dataset, batch_size_per_gpu: int, num_workers: int, seed: int,
                 start_epoch: int = 0) -> None:
        self.sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                          shuffle=True, seed=seed, drop_last=True)
        drop_last = len(self.sampler) >= batch_size_per_gpu
        generator = torch.Generator()
        generator.manual_seed(seed + get_rank())
        self.loader = DataLoader(
            dataset, batch_size=batch_size_per_gpu, sampler=self.sampler, num_workers=num_workers,
            collate_fn=collate_cls_batch, drop_last=drop_last, worker_init_fn=worker_init_fn,
            generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise DatasetError(f"the training set has no images for a batch of {batch_size_per_gpu}")
        self.epoch = start_epoch

    def __iter__(self) -> Iterator[ClsBatch]:
        while True:
            self.sampler.set_epoch(self.epoch)
            transform = getattr(self.loader.dataset, "transform", None)
            if self.loader.num_workers == 0 and hasattr(transform, "set_random_seed"):
                transform.set_random_seed(self.sampler.seed * 1000 + self.epoch * 10 + get_rank())
            yield from self.loader
            self.epoch += 1


def build_val_loader(dataset: Dataset, batch_size_per_gpu: int, num_workers: int) -> DataLoader:
    """Every validation image exactly once over all processes (contiguous shards)."""
    sampler = InferenceSampler(len(dataset))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size_per_gpu, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_cls_batch, worker_init_fn=worker_init_fn)


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device,
                        amp: str = "none") -> tuple[dict[str, float], int]:
    """Top-1/top-5 accuracy (percent) over all processes and the number of skipped images."""
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    meter = ClassificationMeter((1, 5))
    skipped = 0
    try:
        for batch in loader:
            skipped += len(batch.skipped)
            if batch.images.shape[0] == 0:
                continue
            batch = batch.to(device)
            with autocast_context(device, amp):  # type: ignore[arg-type]
                logits = net(batch.images)
            meter.update(logits.float(), batch.labels)
    finally:
        net.train(was_training)
    total_skipped = int(reduce_dict({"skipped": float(skipped)}, average=False)["skipped"])
    if meter.total == 0 and get_world_size() == 1:
        raise DatasetError("no readable validation image: check data.val")
    return meter.compute(), total_skipped


class EpochEndHook(HookBase):
    """After the last iteration of every epoch: validation accuracy, logs, TensorBoard, metrics.

    Args:
        iters_per_epoch: iterations in an epoch.
        num_epochs: epochs of the run (for the log line).
        val_loader: from :func:`build_val_loader`.
        writer: optional MetricsWriter whose SummaryWriter receives ``val/top1``, ``val/top5``.
        max_iters: the run's last iteration count; a partial last epoch (``train.max_iters``) is
            evaluated when it ends. None: runs end on epoch boundaries.
    """

    def __init__(self, iters_per_epoch: int, num_epochs: int, val_loader: DataLoader,
                 writer: Optional[Any] = None, amp: str = "none", max_iters: Optional[int] = None) -> None:
        self.max_iters = max_iters
        self.ipe = iters_per_epoch
        self.num_epochs = num_epochs
        self.val_loader = val_loader
        self.writer = writer
        self.amp = amp
        self.history: list[dict[str, float]] = []
        self._skipped_at_epoch_start = 0
        self._epoch_t0 = 0.0
        self._loss_sum = 0.0
        self._loss_n = 0

    def before_step(self) -> None:
        t = self.trainer
        if t.iter % self.ipe == 0:
            self._skipped_at_epoch_start = t.storage.skipped_images
            self._epoch_t0 = time.perf_counter()
            self._loss_sum, self._loss_n = 0.0, 0
            logger.info("Epoch %d/%d", t.iter // self.ipe + 1, self.num_epochs)

    def after_step(self) -> None:
        t = self.trainer
        if "total_loss" in t.storage.latest:
            self._loss_sum += t.storage.latest["total_loss"][0]
            self._loss_n += 1
        completed = t.iter + 1
        if completed % self.ipe != 0 and completed != self.max_iters:
            return
        epoch = -(-completed // self.ipe)
        metrics, val_skipped = evaluate_classifier(broadcast_buffers(t.model), self.val_loader, t.device, self.amp)
        train_skipped = int(reduce_dict(
            {"s": float(t.storage.skipped_images - self._skipped_at_epoch_start)}, average=False)["s"])
        record = {
            "epoch": epoch,
            "train_loss": self._loss_sum / max(self._loss_n, 1),
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "lr": t.optimizer.param_groups[0]["lr"],
            "skipped_images": train_skipped + val_skipped,
            "time": time.perf_counter() - self._epoch_t0,
        }
        self.history.append(record)
        t.storage.put_eval({"top1": metrics["top1"], "top5": metrics["top5"]}, completed)
        logger.info(
            "Epoch %d/%d done: train loss %.4f  val top1 %.2f%%  top5 %.2f%%  lr %.3g  %.0fs  "
            "skipped unreadable images: %d (train %d, val %d)",
            epoch, self.num_epochs, record["train_loss"], record["top1"], record["top5"], record["lr"],
            record["time"], record["skipped_images"], train_skipped, val_skipped,
        )
        tb = getattr(self.writer, "tb", None)
        if is_main_process() and tb is not None:
            tb.add_scalar("val/top1", record["top1"], completed)
            tb.add_scalar("val/top5", record["top5"], completed)
            tb.add_scalar("epoch/train_loss", record["train_loss"], completed)
            tb.flush()
