"""Samplers and loaders: determinism, resume continuity, DDP sharding, aspect-ratio grouping."""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from detkit.data.collate import DetectionSample
from detkit.data.samplers import (
    AspectRatioGroupedBatchSampler,
    InferenceSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
    repeat_factors,
)
from detkit.structures import Targets


def take(it, n: int) -> list:
    return list(itertools.islice(iter(it), n))


def test_training_sampler_is_deterministic_and_permutes_each_epoch() -> None:
    a = take(TrainingSampler(10, seed=3, rank=0, world_size=1), 50)
    b = take(TrainingSampler(10, seed=3, rank=0, world_size=1), 50)
    c = take(TrainingSampler(10, seed=4, rank=0, world_size=1), 50)
    assert a == b and a != c
    for e in range(5):
        assert sorted(a[10 * e : 10 * e + 10]) == list(range(10))
    assert a[:10] != a[10:20]  # reshuffled each epoch
    # epoch e uses torch.Generator(seed + e)
    g = torch.Generator().manual_seed(3 + 2)
    assert a[20:30] == torch.randperm(10, generator=g).tolist()
    assert take(TrainingSampler(4, shuffle=False, rank=0, world_size=1), 6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_is_the_tail_of_the_full_stream(world_size: int) -> None:
    for rank in range(world_size):
        full = take(TrainingSampler(7, seed=0, rank=rank, world_size=world_size), 60)
        for k in (0, 1, 6, 7, 13, 30):
            resumed = take(TrainingSampler(7, seed=0, rank=rank, world_size=world_size, start=k), 60 - k)
            assert resumed == full[k:], (rank, k)


def test_ddp_shards_are_disjoint_and_cover() -> None:
    n, ws = 12, 3
    streams = [take(TrainingSampler(n, seed=5, rank=r, world_size=ws), 2 * n) for r in range(ws)]
    # dealt round-robin: interleaving the ranks gives the single-process stream
    single = take(TrainingSampler(n, seed=5, rank=0, world_size=1), 2 * n * ws)
    merged = [streams[j % ws][j // ws] for j in range(2 * n * ws)]
    assert merged == single
    for e in range(2 * ws):  # each epoch's indices are split between ranks without overlap
        chunk = [streams[r][k] for k in range(e * n // ws, (e + 1) * n // ws) for r in range(ws)]
        assert sorted(chunk) == list(range(n))


def test_inference_sampler_covers_each_image_once() -> None:
    for n, ws in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        shards = [list(InferenceSampler(n, rank=r, world_size=ws)) for r in range(ws)]
        assert sum(shards, []) == list(range(n))  # contiguous, ordered, exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(InferenceSampler(n, rank=r, world_size=ws)) for r in range(ws)] == list(map(len, shards))
    with pytest.raises(ValueError):
        InferenceSampler(5, rank=2, world_size=2)


def test_aspect_ratio_grouping() -> None:
    ars = [1.5, 0.5, 1.0, 0.7, 2.0, 0.6, 1.3, 0.8, 1.1, 0.9]
    groups = AspectRatioGroupedBatchSampler.group_ids_from_aspect_ratios(ars)
    assert groups == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    sampler = TrainingSampler(10, seed=0, rank=0, world_size=1)
    batches = take(AspectRatioGroupedBatchSampler(sampler, groups, 3), 20)
    assert all(len(b) == 3 and len({groups[i] for i in b}) == 1 for b in batches)
    assert {groups[b[0]] for b in batches} == {0, 1}
    again = take(AspectRatioGroupedBatchSampler(TrainingSampler(10, seed=0, rank=0, world_size=1), groups, 3), 20)
    assert again == batches
    tail = take(AspectRatioGroupedBatchSampler(TrainingSampler(10, seed=0, rank=0, world_size=1), groups, 3, start_batch=7), 13)
    assert tail == batches[7:]


class _Noise:
    """Stand-in for a transform: its own seeded generator, like albumentations' Compose."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def set_random_seed(self, seed: Optional[int]) -> None:
        self.rng = np.random.default_rng(seed)


class _Toy(Dataset):
    """Image i is 1 x 1 (landscape) or 1 x 2 (portrait); a random draw of the transform is stored in the box."""

    def __init__(self, n: int) -> None:
        self.n, self.transform = n, _Noise()
        self.aspect_ratios = [1.0 if i % 3 else 0.5 for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> DetectionSample:
        draw = float(self.transform.rng.random())
        t = Targets(boxes=torch.tensor([[0.0, 0.0, 1.0, draw]]), labels=torch.zeros(1, dtype=torch.int64))
        return DetectionSample(torch.zeros(3, 1, 1, dtype=torch.uint8), t, i, (1, 1), f"{i}.png")


def _ids(loader, n: int) -> list[list[int]]:
    return [b.image_ids for b in take(loader, n)]


def _draws(loader, n: int) -> list[list[float]]:
    """The transform's random draw of each sample of the first ``n`` batches."""
    return [[float(t.boxes[0, 3]) for t in b.targets] for b in take(loader, n)]


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_resume_and_determinism(grouping: bool) -> None:
    ds = _Toy(11)
    full = _ids(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1, aspect_ratio_grouping=grouping), 20)
    again = _ids(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1, aspect_ratio_grouping=grouping), 20)
    assert full == again and all(len(b) == 2 for b in full)
    if grouping:
        assert all(len({ds.aspect_ratios[i] >= 1 for i in b}) == 1 for b in full)
    for k in (1, 5, 12):
        resumed = _ids(
            build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1, start_iter=k, aspect_ratio_grouping=grouping),
            20 - k,
        )
        assert resumed == full[k:], k
    # the augmentation too: a resumed run draws what the uninterrupted run drew for those batches
    full_draws = _draws(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1,
                                                     aspect_ratio_grouping=grouping), 12)
    resumed_draws = _draws(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1, start_iter=5,
                                                        aspect_ratio_grouping=grouping), 7)
    assert resumed_draws == full_draws[5:]
    other_rank = _ids(
        build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=1, aspect_ratio_grouping=grouping, rank=1, world_size=2), 5
    )
    assert other_rank != full[:5]


def test_worker_seeding_is_deterministic_and_distinct() -> None:
    ds = _Toy(8)

    def draws(workers: int) -> tuple[list[list[int]], list[float]]:
        loader = build_detection_train_loader(ds, ds.aspect_ratios, 2, workers, seed=7, aspect_ratio_grouping=False)
        batches = take(loader, 6)
        return [b.image_ids for b in batches], [float(t.boxes[0, 3]) for b in batches for t in b.targets]

    ids_a, draws_a = draws(2)
    ids_b, draws_b = draws(2)
    assert ids_a == ids_b and draws_a == draws_b  # same seed: same data order and augmentation
    assert len(set(draws_a)) == len(draws_a)  # workers do not repeat each other's random stream
    ids_0, draws_0 = draws(0)
    assert ids_0 == ids_a  # data order does not depend on the number of workers
    assert draws_0 == draws_a  # nor does the augmentation


def test_test_loader_keeps_order() -> None:
    ds = _Toy(5)
    assert _ids(build_detection_test_loader(ds, batch_size=2), 10) == [[0, 1], [2, 3], [4]]
    assert _ids(build_detection_test_loader(ds, batch_size=2, rank=1, world_size=2), 10) == [[2, 3], [4]]


def test_repeat_factors_follow_lvis_rule() -> None:
    # 10 images: 8 with class 0 only, 2 with class 1 (one also has class 0); threshold 0.8
    labels = np.array([0] * 8 + [1, 1, 0])
    offsets = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    r = repeat_factors(labels, offsets, 2, 0.8)
    # f(0) = 9/10 -> r = max(1, sqrt(0.8/0.9)) = 1; f(1) = 2/10 -> r = sqrt(4) = 2; an image takes its max
    np.testing.assert_allclose(r, [1.0] * 8 + [2.0, 2.0])
    np.testing.assert_allclose(repeat_factors(labels, offsets, 2, 0.5), [1.0] * 8 + [np.sqrt(2.5)] * 2)
    # images without instances count in f when num_images says so, and keep factor 1
    empty = np.append(offsets, 11)
    np.testing.assert_allclose(repeat_factors(labels, empty, 2, 0.8, num_images=11)[-3:], [np.sqrt(0.8 * 11 / 2)] * 2 + [1.0])


def test_repeat_factor_sampler_repeats_and_rounds_stochastically() -> None:
    r = np.array([1.0] * 8 + [2.0, 2.0])
    s = RepeatFactorTrainingSampler(r, seed=3, rank=0, world_size=1)
    stream = take(s, 5 * 12)
    for e in range(5):  # integer factors: every epoch holds image i exactly r_i times
        counts = np.bincount(stream[12 * e: 12 * (e + 1)], minlength=10)
        assert counts.tolist() == [1] * 8 + [2, 2]
    assert stream[:12] != stream[12:24]
    frac = RepeatFactorTrainingSampler(np.array([1.0, 1.25, 2.5]), seed=0, rank=0, world_size=1)
    per_epoch = [np.bincount(frac._epoch_order(e), minlength=3) for e in range(400)]
    assert all(c[0] == 1 and c[1] in (1, 2) and c[2] in (2, 3) for c in per_epoch)
    mean = np.mean(per_epoch, axis=0)
    assert abs(mean[1] - 1.25) < 0.08 and abs(mean[2] - 2.5) < 0.1 and mean[0] == 1.0
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorTrainingSampler(np.array([1.0, 0.5]))


@pytest.mark.parametrize("world_size", [1, 2])
def test_repeat_factor_resume_and_ddp_shards(world_size: int) -> None:
    r = np.array([1.0, 1.5, 3.2, 1.0, 2.7, 1.1, 1.0])
    single = take(RepeatFactorTrainingSampler(r, seed=9, rank=0, world_size=1), 200)
    streams = [take(RepeatFactorTrainingSampler(r, seed=9, rank=k, world_size=world_size), 200 // world_size)
               for k in range(world_size)]
    assert [streams[j % world_size][j // world_size] for j in range(200)] == single  # dealt round-robin
    for k in range(world_size):
        for start in (1, 11, 12, 40, 77):
            resumed = take(RepeatFactorTrainingSampler(r, seed=9, rank=k, world_size=world_size, start=start), 20)
            assert resumed == streams[k][start:start + 20], (k, start)


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_with_repeat_factors_resumes_exactly(grouping: bool) -> None:
    ds = _Toy(9)
    r = np.array([1.0, 4.0, 1.0, 1.0, 2.5, 1.0, 1.0, 1.0, 1.3])

    def ids(start: int, n: int) -> list[list[int]]:
        return _ids(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=4, start_iter=start,
                                                 aspect_ratio_grouping=grouping, repeat_factors=r), n)

    full = ids(0, 30)
    assert full != _ids(build_detection_train_loader(ds, ds.aspect_ratios, 2, 0, seed=4,
                                                     aspect_ratio_grouping=grouping), 30)
    counts = np.bincount([i for b in full for i in b], minlength=9)
    assert counts[1] > 2 * counts[0]  # image 1 (factor 4) comes back about 4 times as often
    if grouping:
        assert all(len({ds.aspect_ratios[i] >= 1 for i in b}) == 1 for b in full)
    for k in (1, 7, 18):
        assert ids(k, 30 - k) == full[k:], k
