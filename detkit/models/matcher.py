"""Assign predictions (anchors/proposals) to ground truth, and sample balanced minibatches.

Semantics follow Detectron2's ``Matcher``/``subsample_labels``; the low-quality-match
rule is torchvision's (every prediction tied for the best IoU of some GT is made positive).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Matcher", "subsample_labels"]


class Matcher:
    """Match each prediction to its best ground-truth element and label it by IoU band.

    Args:
        thresholds: increasing IoU thresholds splitting [0, 1] into ``len(thresholds) + 1``
            bands, e.g. ``[0.3, 0.7]``. A band is ``[lo, hi)``.
        labels: one label per band, each in {-1 (ignore), 0 (negative), 1 (positive)},
            e.g. ``[0, -1, 1]``.
        allow_low_quality_matches: also make positive every prediction that has the highest
            IoU (ties included) with some GT, even if it falls below the positive threshold.
            GTs that overlap no prediction at all (max IoU 0) are skipped.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False) -> None:
        thresholds = [float(t) for t in thresholds]
        labels = [int(lab) for lab in labels]
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher: need len(labels) == len(thresholds) + 1, got thresholds={thresholds} labels={labels}"
            )
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher: thresholds must be increasing, got {thresholds}")
        if any(lab not in (-1, 0, 1) for lab in labels):
            raise ValueError(f"Matcher: labels must be in {{-1, 0, 1}}, got {labels}")
        self.thresholds = [float("-inf")] + thresholds + [float("inf")]
        self.labels = labels
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Match predictions to ground truth.

        Args:
            iou: float [G, N] pairwise quality (IoU) between G ground-truth and N predictions.

        Returns:
            matched_idx: int64 [N] index of the best GT for each prediction (0 when G == 0).
            match_labels: int8 [N] -1 ignore, 0 negative, 1 positive.
        """
        assert iou.dim() == 2, f"Matcher: expected a [G, N] matrix, got shape {tuple(iou.shape)}"
        num_pred = iou.shape[1]
        if iou.shape[0] == 0:
            matched_idx = iou.new_zeros((num_pred,), dtype=torch.int64)
            return matched_idx, iou.new_zeros((num_pred,), dtype=torch.int8)

        matched_vals, matched_idx = iou.max(dim=0)  # (N,), (N,)
        match_labels = matched_idx.new_ones((num_pred,), dtype=torch.int8)
        for label, lo, hi in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            in_band = (matched_vals >= lo) & (matched_vals < hi)
            match_labels[in_band] = label

        if self.allow_low_quality_matches and num_pred > 0:
            best_per_gt, _ = iou.max(dim=1)  # (G,)
            # (G, N) ties with each GT's best; GTs without any overlap contribute nothing
            is_best = (iou == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)
            match_labels[is_best.any(dim=0)] = 1
        return matched_idx, match_labels


def subsample_labels(
    labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[Tensor, Tensor]:
    """Randomly sample up to ``num_samples`` predictions with at most ``positive_fraction`` positives.

    Negatives fill the rest of the budget when positives are scarce.

    Args:
        labels: int [N]; -1 ignore, ``bg_label`` negative, any other value >= 0 positive.
        num_samples: total number of samples wanted.
        positive_fraction: maximum fraction of positives.
        bg_label: the label that marks negatives.

    Returns:
        pos_idx, neg_idx: int64 indices into ``labels`` of the sampled positives and negatives.
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)

    num_pos = min(int(num_samples * positive_fraction), positive.numel())
    num_neg = min(num_samples - num_pos, negative.numel())

    perm_pos = torch.randperm(positive.numel(), device=labels.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=labels.device)[:num_neg]
    return positive[perm_pos], negative[perm_neg]
