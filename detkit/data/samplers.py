"""Samplers and data loaders for training (infinite, seeded, resumable, DDP-sharded) and inference.

Data order is a pure function of ``(seed, rank, world_size)``: the training stream is the
concatenation of per-epoch permutations drawn with ``torch.Generator(seed + epoch)``, dealt
round-robin to the ranks. The augmentation of sample ``j`` of training batch ``b`` is seeded from
``(seed, rank, b, j)`` alone (:class:`SeededIndex`). So a run resumed at iteration ``k`` replays
exactly the batches, augmentation included, that the uninterrupted run would have produced from
iteration ``k`` on, whatever the number of data-loading workers.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .collate import collate_detection

__all__ = [
    "SeededIndex",
    "TrainingSampler",
    "RepeatFactorTrainingSampler",
    "repeat_factors",
    "AspectRatioGroupedBatchSampler",
    "InferenceSampler",
    "build_detection_train_loader",
    "build_detection_test_loader",
    "worker_init_fn",
]


def _dist_info(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices for one rank.

    The global stream is ``perm(seed + 0) ++ perm(seed + 1) ++ ...`` (each a permutation of
    ``range(size)`` drawn with ``torch.Generator``); rank ``r`` of ``world_size`` gets global
    positions ``r, r + world_size, r + 2*world_size, ...``.

    Args:
        size: dataset length (> 0).
        seed: base seed, shared by all ranks.
        shuffle: False gives ``0, 1, ..., size-1`` repeated.
        rank, world_size: default to torch.distributed when initialized, else 0 / 1.
        start: number of samples this rank already consumed; the stream starts after them,
            so ``TrainingSampler(start=k)`` equals the full stream without its first ``k`` items.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        start: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        if start < 0:
            raise ValueError(f"TrainingSampler start must be >= 0, got {start}")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.start = int(start)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def _epoch_size(self, epoch: int) -> int:
        """Length of epoch ``epoch``'s order (without drawing the order itself)."""
        return self.size

    def __iter__(self) -> Iterator[int]:
        # global position of this rank's j-th sample: rank + world_size * (start + j)
        offset, epoch = self.rank + self.world_size * self.start, 0
        while offset >= (size := self._epoch_size(epoch)):
            offset -= size
            epoch += 1
        while True:
            order = self._epoch_order(epoch)
            while offset < len(order):
                yield order[offset]
                offset += self.world_size
            epoch += 1
            offset -= len(order)


def repeat_factors(labels: np.ndarray, offsets: np.ndarray, num_classes: int, threshold: float,
                   num_images: Optional[int] = None) -> np.ndarray:
    """LVIS repeat factors (Gupta et al. 2019; Detectron2's ``repeat_factors_from_category_frequency``).

    With ``f(c)`` the fraction of images holding class ``c``, class ``c`` gets
    ``r(c) = max(1, sqrt(threshold / f(c)))`` and an image the largest ``r(c)`` of its classes (1 without
    instances).

    Args:
        labels: int64 [M] labels of the instances, image after image.
        offsets: int64 [N + 1]; image ``i``'s instances are ``labels[offsets[i]:offsets[i + 1]]``.
        num_classes: K (labels are in ``[0, K)``).
        threshold: ``t``; classes in fewer than a fraction ``t`` of the images are repeated.
        num_images: the images ``f`` counts (default N; more when images without instances count too).

    Returns:
        float64 [N], the repeat factor of each image (>= 1).
    """
    n = len(offsets) - 1
    image = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(image * num_classes + np.asarray(labels, np.int64))  # (image, class) present
    with_class = np.bincount(pairs % num_classes, minlength=num_classes)
    freq = with_class / max(num_images if num_images is not None else n, 1)
    with np.errstate(divide="ignore"):
        per_class = np.maximum(1.0, np.sqrt(threshold / freq))  # inf only for classes no image has
    out = np.ones(n)
    np.maximum.at(out, pairs // num_classes, per_class[pairs % num_classes])
    return out


class RepeatFactorTrainingSampler(TrainingSampler):
    """:class:`TrainingSampler` where image ``i`` appears ``repeat_factors[i]`` times per epoch on average
    (Detectron2's ``RepeatFactorTrainingSampler``, for class-balanced sampling with :func:`repeat_factors`).

    Epoch ``e`` draws, with ``torch.Generator(seed + e)``, a uniform ``u_i`` per image and repeats image ``i``
    ``floor(r_i) + (u_i < frac(r_i))`` times (stochastic rounding), then shuffles those indices with the
    same generator. Epochs differ in length; the stream, the DDP sharding and ``start`` are as for
    :class:`TrainingSampler`, so a resumed run sees the same samples.

    Args:
        repeat_factors: float [N], each >= 1.
        seed, rank, world_size, start: as for :class:`TrainingSampler`.
    """

    def __init__(self, repeat_factors: Sequence[float], seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, start: int = 0) -> None:
        r = np.asarray(repeat_factors, np.float64)
        if r.ndim != 1 or (r < 1).any() or not np.isfinite(r).all():
            raise ValueError("repeat factors must be a 1-D array of finite numbers >= 1")
        super().__init__(len(r), seed=seed, shuffle=True, rank=rank, world_size=world_size, start=start)
        self.int_part = np.floor(r).astype(np.int64)
        self.frac_part = r - self.int_part

    def _repeats(self, epoch: int, g: torch.Generator) -> np.ndarray:
        """int64 [N]: how often each image appears in epoch ``epoch`` (draws from ``g``)."""
        u = torch.rand(self.size, generator=g, dtype=torch.float64).numpy()
        return self.int_part + (u < self.frac_part)

    def _epoch_size(self, epoch: int) -> int:
        return int(self._repeats(epoch, torch.Generator().manual_seed(self.seed + epoch)).sum())

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        indices = np.repeat(np.arange(self.size), self._repeats(epoch, g))
        return indices[torch.randperm(len(indices), generator=g).numpy()].tolist()


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batch indices so that each batch holds only landscape (w >= h) or only portrait images.

    Deterministic given the index sampler. ``start_batch`` skips the first batches by replaying
    the grouping (cheap: indices only), so resumed runs see the same batches.

    Args:
        sampler: an (infinite) index sampler, e.g. :class:`TrainingSampler` with ``start=0``.
        group_ids: group of each dataset index (0: w >= h, 1: w < h); one group disables grouping.
        batch_size: images per batch.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, start_batch: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)

    @staticmethod
    def group_ids_from_aspect_ratios(aspect_ratios: Sequence[float]) -> list[int]:
        """0 for w/h >= 1 (landscape or square), 1 for portrait."""
        return [0 if ar >= 1.0 else 1 for ar in aspect_ratios]

    def _batches(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for idx in self.sampler:
            bucket = buckets.setdefault(int(self.group_ids[idx]), [])
            bucket.append(int(idx))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self._batches(), self.start_batch, None)


class SeededIndex(NamedTuple):
    """A training sample: dataset ``index`` and the ``seed`` its augmentation is drawn with."""

    index: int
    seed: int


def _sample_seed(base: int, batch: int, position: int) -> int:
    return (base * 1_000_003 + batch * 4_099 + position) % 2**31


class _SeededBatches(Sampler[list[SeededIndex]]):
    """Batches of ``batch_sampler`` (numbered from ``start_batch``) with a seed per sample."""

    def __init__(self, batch_sampler: Sampler[list[int]], base_seed: int, start_batch: int) -> None:
        self.batch_sampler, self.base_seed, self.start_batch = batch_sampler, int(base_seed), int(start_batch)

    def __iter__(self) -> Iterator[list[SeededIndex]]:
        for b, batch in enumerate(self.batch_sampler, start=self.start_batch):
            yield [SeededIndex(i, _sample_seed(self.base_seed, b, j)) for j, i in enumerate(batch)]


class _ReseededDataset(Dataset):
    """``dataset`` whose ``transform`` is reseeded with each :class:`SeededIndex`'s seed before its sample
    is loaded (through ``dataset.__getitems__`` when it has one, else ``dataset[index]``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[SeededIndex]) -> list[Any]:
        fetch = getattr(self.dataset, "__getitems__", None)
        out = []
        for key in keys:
            self.dataset.transform.set_random_seed(key.seed)  # type: ignore[attr-defined]
            out.append(fetch([key.index])[0] if fetch is not None else self.dataset[key.index])
        return out


class InferenceSampler(Sampler[int]):
    """Contiguous shard of ``range(size)`` for one rank; the shards cover every index exactly once."""

    def __init__(self, size: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.size = int(size)
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.begin = self.size * self.rank // self.world_size
        self.end = self.size * (self.rank + 1) // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class _BatchList(Sampler[list[int]]):
    """Finite batches over a finite sampler (last batch may be smaller)."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        while batch := list(itertools.islice(it, self.batch_size)):
            yield batch

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size  # type: ignore[arg-type]


def worker_init_fn(worker_id: int) -> None:
    """Seed python, numpy and the dataset's transform from the worker's torch seed.

    torch derives each worker's seed from the DataLoader's generator, so a seeded generator
    makes every worker's augmentation stream reproducible (and different across workers).
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    # NB: no cv2.setNumThreads() here: after fork it can deadlock on OpenCV's inherited thread pool


def build_detection_train_loader(
    dataset: Dataset,
    aspect_ratios: Sequence[float],
    batch_size_per_gpu: int,
    num_workers: int,
    seed: int,
    start_iter: int = 0,
    aspect_ratio_grouping: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    repeat_factors: Optional[Sequence[float]] = None,
) -> DataLoader:
    """Infinite, deterministic training loader yielding :class:`~detkit.structures.Batch`.

    Batch ``i`` of the loader, augmentation included, is the same whether the run started at
    iteration 0 or was resumed with ``start_iter <= i``, and whatever ``num_workers``. Each rank gets
    a different shard of the stream and different augmentation seeds. ``aspect_ratios`` are per-image w/h (``CocoData.aspect_ratios``).
    ``repeat_factors`` (float [N], see :func:`repeat_factors`) switch to :class:`RepeatFactorTrainingSampler`.
    """
    rank, world_size = _dist_info(rank, world_size)
    n = len(dataset)  # type: ignore[arg-type]
    if len(aspect_ratios) != n:
        raise ValueError(f"aspect_ratios has {len(aspect_ratios)} entries for a dataset of {n} images")
    if repeat_factors is not None and len(repeat_factors) != n:
        raise ValueError(f"repeat_factors has {len(repeat_factors)} entries for a dataset of {n} images")

    def index_sampler(start: int) -> TrainingSampler:
        if repeat_factors is None:
            return TrainingSampler(n, seed=seed, rank=rank, world_size=world_size, start=start)
        return RepeatFactorTrainingSampler(repeat_factors, seed=seed, rank=rank, world_size=world_size, start=start)

    if aspect_ratio_grouping:
        group_ids = AspectRatioGroupedBatchSampler.group_ids_from_aspect_ratios(aspect_ratios)
        batch_sampler: Sampler[list[int]] = AspectRatioGroupedBatchSampler(
            index_sampler(0), group_ids, batch_size_per_gpu, start_batch=start_iter
        )
    else:
        batch_sampler = AspectRatioGroupedBatchSampler(index_sampler(start_iter * batch_size_per_gpu), [0] * n,
                                                       batch_size_per_gpu)
    aug_seed = (seed * 1_000_003 + rank * 7919) % 2**31
    if hasattr(getattr(dataset, "transform", None), "set_random_seed"):
        # each sample's augmentation depends on (seed, rank, batch number, position) only
        batch_sampler = _SeededBatches(batch_sampler, aug_seed, start_iter)
        dataset = _ReseededDataset(dataset)
    generator = torch.Generator()
    generator.manual_seed(aug_seed + start_iter)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        worker_init_fn=worker_init_fn,
        generator=generator,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def build_detection_test_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataLoader:
    """Finite loader over this rank's contiguous shard (every image exactly once across ranks)."""
    sampler = InferenceSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    generator = torch.Generator()
    generator.manual_seed(0)
    return DataLoader(
        dataset,
        batch_sampler=_BatchList(sampler, batch_size),
        num_workers=num_workers,
        collate_fn=collate_detection,
        worker_init_fn=worker_init_fn,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
