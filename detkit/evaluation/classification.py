"""Top-k accuracy for classification pretraining (``top1`` / ``top5`` in percent)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["topk_accuracy", "topk_correct", "ClassificationMeter"]


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be [N] with N={logits.shape[0]}, got shape {tuple(targets.shape)}")


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``.

    ``k`` larger than the number of classes C is clipped to C (so it counts every sample).
    """
    _check(logits, targets)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    num_classes = logits.shape[1]
    max_k = min(max(ks), num_classes)
    top = logits.detach().topk(max_k, dim=1).indices  # (N, max_k), highest first
    hits = top.eq(targets.detach().view(-1, 1).to(top.device))  # (N, max_k)
    return {k: int(hits[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent, keyed ``top{k}``.

    Args:
        logits: [N, C] scores (N > 0).
        targets: [N] class indices in [0, C).
        ks: the k values; each is clipped to C.
    """
    n = logits.shape[0] if logits.dim() > 0 else 0
    if n == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    return {f"top{k}": 100.0 * c / n for k, c in topk_correct(logits, targets, ks).items()}


class ClassificationMeter:
    """Accumulates top-k correct counts over batches; :meth:`compute` sums them across ranks.

    Args:
        ks: the k values reported as ``top{k}``.
        distributed: None all-reduces when ``torch.distributed`` is initialized, False never,
            True requires an initialized process group. Samples repeated by a padding
            distributed sampler are counted as often as they are seen.
    """

    def __init__(self, ks: Sequence[int] = (1, 5), distributed: Optional[bool] = None) -> None:
        self.ks = tuple(ks)
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self.correct = {k: 0 for k in self.ks}
        self.total = 0

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch (logits [N, C], targets [N])."""
        for k, c in topk_correct(logits, targets, self.ks).items():
            self.correct[k] += c
        self.total += int(targets.shape[0])

    def _use_distributed(self) -> bool:
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise RuntimeError("ClassificationMeter(distributed=True) but torch.distributed is not initialized")
        return ready and self.distributed is not False and dist.get_world_size() > 1

    def compute(self) -> dict[str, float]:
        """Accuracy in percent over everything seen (on all ranks), keyed ``top{k}``.

        Must be called on every rank when distributed. Raises if no sample was seen.
        """
        counts = [self.total] + [self.correct[k] for k in self.ks]
        if self._use_distributed():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor(counts, dtype=torch.int64, device=device)
            dist.all_reduce(t)
            counts = t.tolist()
        total = counts[0]
        if total == 0:
            raise ValueError("ClassificationMeter.compute(): no samples were seen")
        return {f"top{k}": 100.0 * c / total for k, c in zip(self.ks, counts[1:])}
