"""Calibration of a randomly initialized Detectron2 R-CNN for ``parity_detectron2.py``.

With raw random weights Detectron2's RPN keeps a handful of proposals, which proves nothing. One
forward pass over the compared images sets every FrozenBN from the statistics of its own input and
spreads the RPN objectness, box classifier, box deltas and mask logits (each stage's classifier and deltas
for Cascade R-CNN, the last stage's background set so that the stage-averaged scores keep tens of
detections), so there are tens of varied detections per image. It only changes the weights; the
comparison itself is in parity_detectron2.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["calibrate_d2"]


def _rand(shape: tuple[int, ...], gen: torch.Generator, kind: str = "normal") -> torch.Tensor:
    return torch.randn(shape, generator=gen) if kind == "normal" else torch.rand(shape, generator=gen)


def _scaled_projection(mod: nn.Module, x: torch.Tensor, target_std: float, gen: torch.Generator,
                       blind_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random weights for a Linear / 1x1 Conv2d ``mod`` so that its outputs on ``x`` have per-channel
    standard deviation ``target_std``; returns the outputs (bias zero). ``blind_to`` [M, C] (Linear
    only): input directions the weights are made orthogonal to (e.g. per-image mean features, so
    that outputs vary between RoIs of an image rather than between images)."""
    w = _rand(tuple(mod.weight.shape), gen)
    if isinstance(mod, nn.Linear):  # x: [R, C]
        if blind_to is not None:
            q, _ = torch.linalg.qr(blind_to.t())  # [C, M] orthonormal basis of the directions
            w -= (w @ q) @ q.t()
        out = x @ w.t()  # [R, K]
        std = out.std(0)
    else:  # x: [N, C, H, W], 1x1 conv
        out = F.conv2d(x, w)
        std = out.transpose(0, 1).reshape(out.shape[1], -1).std(1)
    scale = target_std / std.clamp_min(1e-12)
    mod.weight.copy_(w * scale.view(-1, *([1] * (w.dim() - 1))))
    mod.bias.zero_()
    return out * scale.view(1, -1, *([1] * (out.dim() - 2)))


def _background_bias(fg_logits: list[torch.Tensor], thresh: float, target: float,
                     earlier: Optional[list[torch.Tensor]] = None, num_stages: int = 1) -> float:
    """Background logit (the same for every RoI) at which the image with the fewest (roi, class)
    pairs scoring above ``thresh`` has ``target`` of them; ``fg_logits``: [R_i, K] per image.

    Cascade R-CNN scores are the mean of ``num_stages`` stages' probabilities: ``earlier`` [R_i, K] per
    image is the sum of the earlier stages' foreground probabilities, and the count is taken on
    ``(earlier + this stage's probabilities) / num_stages``."""
    lo, hi = -30.0, 60.0
    for _ in range(60):
        mid = (lo + hi) / 2
        counts = []
        for i, f in enumerate(fg_logits):
            prob = (f - torch.logaddexp(torch.logsumexp(f, 1, keepdim=True), torch.tensor(mid))).exp()
            if earlier is not None:
                prob = (earlier[i] + prob) / num_stages
            counts.append(float((prob > thresh).sum()))
        lo, hi = (mid, hi) if min(counts) > target else (lo, mid)
    return (lo + hi) / 2


@torch.no_grad()
def calibrate_d2(model: nn.Module, images_bgr: list[np.ndarray], seed: int, min_pairs: float = 40.0,
                 cls_std: float = 1.5) -> dict:
    """Set Detectron2's random weights from the activations of one forward pass (see module doc).

    Returns counts of what was set, and the number of detections per calibration image."""
    from detectron2.layers import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    done: dict[str, int] = {"frozen_bn": 0}
    hooks = []

    def bn_hook(mod: nn.Module, args: tuple) -> None:
        if getattr(mod, "_parity_set", False):
            return
        x = args[0]
        var = x.var((0, 2, 3), unbiased=False)
        n = mod.num_features
        mod.running_mean.copy_(x.mean((0, 2, 3)))
        mod.running_var.copy_(var + 1e-3 * var.mean() + 1e-6)  # no near-zero variances (float noise x 316)
        mod.weight.copy_(_rand((n,), gen, "uniform") * 0.5 + 0.5)
        mod.bias.copy_(_rand((n,), gen) * 0.2)
        mod._parity_set = True
        done["frozen_bn"] += 1

    def once(key: str, fn: Callable[[nn.Module, torch.Tensor], None]) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if key not in done:
                fn(mod, args[0])
                done[key] = 1
        return hook

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    rpn = model.proposal_generator.rpn_head
    hooks.append(rpn.objectness_logits.register_forward_pre_hook(
        once("rpn_objectness", lambda m, x: _scaled_projection(m, x, 1.5, gen))))
    hooks.append(rpn.anchor_deltas.register_forward_pre_hook(
        once("rpn_deltas", lambda m, x: _scaled_projection(m, x, 0.1, gen))))
    # one box predictor, or one per stage (CascadeROIHeads: a ModuleList, each stage calibrated alike)
    box_pred = model.roi_heads.box_predictor
    preds = list(box_pred) if isinstance(box_pred, nn.ModuleList) else [box_pred]
    num_classes = preds[0].num_classes

    rois_per_image: list[int] = []
    hooks.append(model.proposal_generator.register_forward_hook(
        lambda m, i, out: rois_per_image.extend(len(p) for p in out[0])))

    earlier: list[torch.Tensor] = []  # cascade: per image, the sum of the calibrated stages' fg probabilities

    def cls_hook(stage: int) -> Callable[[nn.Module, torch.Tensor], None]:
        def hook(m: nn.Module, x: torch.Tensor) -> None:
            x = x.flatten(1)  # [R, C], the RoIs of each image in turn (every cascade stage keeps all rows at test)
            image_means = torch.stack([part.mean(0) for part in x.split(rois_per_image)])  # [N, C]
            logits = _scaled_projection(m, x, cls_std, gen, blind_to=image_means)  # [R, K + 1], background last
            m.bias[:num_classes].copy_(_rand((num_classes,), gen) * 0.5)
            m.weight[num_classes].zero_()  # background logit = its bias, the same for every RoI
            fg = list((logits[:, :num_classes] + m.bias[:num_classes]).split(rois_per_image))
            last = len(preds) > 1 and stage == len(preds) - 1  # the averaged scores get the target count
            m.bias[num_classes] = _background_bias(fg, preds[0].test_score_thresh, min_pairs,
                                                   earlier if last else None, len(preds))
            probs = [(f - torch.logaddexp(torch.logsumexp(f, 1, keepdim=True), m.bias[num_classes])).exp() for f in fg]
            earlier[:] = probs if not earlier else [a + b for a, b in zip(earlier, probs)]
        return hook

    stage_keys = [""] if len(preds) == 1 else [f"_stage{k}" for k in range(len(preds))]
    for stage, (pred, key) in enumerate(zip(preds, stage_keys)):
        hooks.append(pred.cls_score.register_forward_pre_hook(once("box_cls" + key, cls_hook(stage))))
        hooks.append(pred.bbox_pred.register_forward_pre_hook(
            once("box_deltas" + key, lambda m, x: _scaled_projection(m, x.flatten(1), 0.5, gen))))
    if getattr(model.roi_heads, "mask_on", False):

        def mask_hook(m: nn.Module, x: torch.Tensor) -> None:
            out = _scaled_projection(m, x, 3.0, gen)  # [R, K, 28, 28]
            m.bias.copy_(-out.mean((0, 2, 3)))

        hooks.append(model.roi_heads.mask_head.predictor.register_forward_pre_hook(once("mask_logits", mask_hook)))
    inputs = [{"image": torch.from_numpy(im.transpose(2, 0, 1).astype(np.float32))} for im in images_bgr]
    outs = model(inputs)
    for h in hooks:
        h.remove()
    done["calibration_detections"] = [len(o["instances"]) for o in outs]
    expected = {"rpn_objectness", "rpn_deltas"} | {f"box_{what}{key}" for what in ("cls", "deltas") for key in stage_keys}
    expected |= {"mask_logits"} if getattr(model.roi_heads, "mask_on", False) else set()
    if not expected <= set(done):
        raise RuntimeError(f"calibration did not reach {sorted(expected - set(done))}")
    return done
