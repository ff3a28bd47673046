"""Mask head, mask loss/inference and mask pasting, against torchvision's implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image

from detkit.models.roi_heads import MaskRCNNHead, mask_rcnn_inference, mask_rcnn_loss, paste_masks_in_image


def test_mask_head_shapes_names_and_init() -> None:
    head = MaskRCNNHead(16, num_classes=5, conv_dims=(32, 32, 32, 32))
    out = head(torch.randn(3, 16, 14, 14))
    assert out.shape == (3, 5, 28, 28)
    names = set(dict(head.named_parameters()))
    assert {"convs.0.conv.weight", "convs.3.conv.bias", "deconv.weight", "predictor.weight"} <= names
    assert head.deconv.kernel_size == (2, 2) and head.deconv.stride == (2, 2)
    assert head.predictor.kernel_size == (1, 1)
    assert head.predictor.bias.abs().sum() == 0 and head.convs[0].conv.bias.abs().sum() == 0
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_ch * k * k))
    std = head.convs[1].conv.weight.std().item()
    assert abs(std - (2.0 / (32 * 9)) ** 0.5) < 0.01
    agnostic = MaskRCNNHead(16, num_classes=5, conv_dims=(32,), cls_agnostic=True)
    assert agnostic(torch.randn(2, 16, 7, 7)).shape == (2, 1, 14, 14)
    gn = MaskRCNNHead(16, num_classes=2, conv_dims=(32, 32), norm="GN")
    assert type(gn.convs[0].norm).__name__ == "GroupNorm" and gn.convs[0].conv.bias is None
    assert gn(torch.randn(0, 16, 14, 14)).shape == (0, 2, 28, 28)


def _gt_masks(g: torch.Generator, n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.rand(n, 4, generator=g) * torch.tensor([w / 2, h / 2, w / 2, h / 2])
    boxes[:, 2:] += boxes[:, :2] + 4
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        masks[i, y1:y2, x1 : (x1 + x2) // 2] = 1
    return boxes, masks


def test_mask_loss_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    k, m = 4, 28
    sizes = [(60, 80), (50, 40)]
    props, gts, idxs, labels = [], [], [], []
    for (h, w), n_gt, n_pos in zip(sizes, (3, 2), (7, 5)):
        gt_boxes, gt_masks = _gt_masks(g, n_gt, h, w)
        idx = torch.randint(0, n_gt, (n_pos,), generator=g)
        props.append(gt_boxes[idx] + torch.randn(n_pos, 4, generator=g))
        gts.append(gt_masks)
        idxs.append(idx)
        labels.append(torch.randint(0, k, (n_gt,), generator=g))
    logits = torch.randn(12, k, m, m, generator=g)
    gt_classes = torch.cat([lab[i] for lab, i in zip(labels, idxs)])
    ours = mask_rcnn_loss(logits, props, gts, idxs, gt_classes)
    # torchvision: labels include background 0, so channel c+1 holds detkit class c
    tv_logits = torch.cat([torch.zeros(12, 1, m, m), logits], dim=1)
    ref = maskrcnn_loss(tv_logits, props, gts, [lab + 1 for lab in labels], idxs)
    torch.testing.assert_close(ours, ref)
    assert ours.item() > 0
    # class-agnostic logits use channel 0
    agn = mask_rcnn_loss(logits[:, :1], props, gts, idxs, gt_classes)
    ref_agn = maskrcnn_loss(
        torch.cat([torch.zeros(12, 1, m, m), logits[:, :1]], 1), props, gts, [torch.ones_like(lab) for lab in labels], idxs
    )
    torch.testing.assert_close(agn, ref_agn)
    # no positives: zero that keeps the graph
    empty = torch.zeros(0, k, m, m, requires_grad=True)
    z = mask_rcnn_loss(empty, [torch.zeros(0, 4)] * 2, gts, [torch.zeros(0, dtype=torch.int64)] * 2,
                       torch.zeros(0, dtype=torch.int64))
    z.backward()
    assert z.item() == 0.0 and empty.grad is not None


def test_mask_inference_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 3, 28, 28, generator=g)
    labels = [torch.tensor([0, 2, 1]), torch.tensor([], dtype=torch.int64), torch.tensor([2, 2, 0, 1])]
    ours = mask_rcnn_inference(logits, labels)
    tv_logits = torch.cat([torch.zeros(7, 1, 28, 28), logits], dim=1)
    ref = maskrcnn_inference(tv_logits, [lab + 1 for lab in labels])
    assert [tuple(o.shape) for o in ours] == [(3, 1, 28, 28), (0, 1, 28, 28), (4, 1, 28, 28)]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _smooth_masks(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    raw = torch.rand(n, 1, m, m, generator=g)
    return (F.avg_pool2d(raw, 5, 1, 2)[:, 0] - 0.5) * 6 + 0.5  # blobs with values spread around 0.5


@pytest.mark.parametrize("image_size", [(200, 266), (97, 64)])
def test_paste_matches_torchvision(image_size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    h, w = image_size
    n, m = 40, 28
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.6 + 0.2
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    boxes[:8] = torch.tensor(
        [
            [0.0, 0.0, w, h],  # whole image
            [0.0, 0.0, 10.0, 12.0],  # top-left corner
            [w - 15.0, h - 9.0, w, h],  # bottom-right corner
            [0.0, h / 3, w, h / 3 + 5],  # touches left and right borders
            [5.0, 5.0, 5.6, 5.4],  # sub-pixel box
            [20.0, 30.0, 21.0, 31.0],  # 1 px box
            [w - 1.0, 0.0, w, h],  # 1 px wide strip on the right border
            [3.0, 7.0, 3.0, 7.0],  # degenerate box
        ]
    )
    probs = _smooth_masks(n, m, g).clamp(0, 1)
    probs[:8] = probs[:8].clamp(min=0.6)  # tiny/border boxes are fully "on": they must paste something
    ours = paste_masks_in_image(probs, boxes, image_size, threshold=0.5)
    ref = tv_paste_masks_in_image(probs[:, None], boxes, image_size)[:, 0] > 0.5
    assert ours.shape == (n, h, w) and ours.dtype == torch.bool
    iou = _mask_iou(ours, ref)
    assert iou.min().item() >= 0.98, f"min mask IoU {iou.min().item():.4f}"
    assert ref[:8].flatten(1).any(1).all(), "border/tiny cases should be non-empty in torchvision too"
    assert ours[:8].flatten(1).any(1).all() and ours[0, h // 2, w // 2]
    assert ours[6, :, : w - 3].sum() == 0 and ours[6, :, w - 1].any(), "strip stays on the right border"
    # [N, 1, M, M] input and other thresholds behave the same way
    ours9 = paste_masks_in_image(probs[:, None], boxes, image_size, threshold=0.9)
    ref9 = tv_paste_masks_in_image(probs[:, None], boxes, image_size)[:, 0] > 0.9
    assert _mask_iou(ours9, ref9).min().item() >= 0.98
    # chunking does not change the result
    small_chunks = paste_masks_in_image(probs, boxes, image_size, threshold=0.5, max_chunk_pixels=500)
    assert torch.equal(small_chunks, ours)


def test_paste_empty_and_bad_input() -> None:
    out = paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (30, 40))
    assert out.shape == (0, 30, 40) and out.dtype == torch.bool
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(torch.zeros(2, 28, 28), torch.zeros(3, 4), (30, 40))


def test_aligned_targets_put_mask_cells_on_pixel_centres() -> None:
    """A box that covers exactly a GT square's pixels: in the aligned frame every target cell is inside
    the square (target 1 everywhere); torchvision's frame (aligned=False) samples half a pixel off, so
    its last row and column straddle the square's edge. Logits of +20 everywhere show the difference."""
    gt = torch.zeros(1, 16, 16)
    gt[0, 4:12, 4:12] = 1.0  # pixels 4..11: the box [4, 12) in pixel-edge coordinates
    box = [torch.tensor([[4.0, 4.0, 12.0, 12.0]])]
    logits = torch.full((1, 1, 8, 8), 20.0)
    args = (logits, box, [gt], [torch.tensor([0])], torch.tensor([0]))
    aligned = mask_rcnn_loss(*args, aligned=True)
    unaligned = mask_rcnn_loss(*args, aligned=False)
    assert float(aligned) < 1e-6
    # 15 of 64 cells sample on the edge (targets 0.5 or 0.25): their BCE at logit 20 is ~10 or ~15
    assert float(unaligned) > 1.0


def test_target_frame_comes_from_the_config() -> None:
    from detkit.config import DetectionConfig
    from detkit.models.build import build_detector

    cfg = DetectionConfig()
    cfg.model.meta_architecture = "mask_rcnn"
    cfg.model.backbone.name = "resnet18"
    assert build_detector(cfg, 2).roi_heads.mask_head.target_aligned is cfg.model.roi_heads.mask_head.target_aligned
    cfg.model.roi_heads.mask_head.target_aligned = not cfg.model.roi_heads.mask_head.target_aligned
    assert build_detector(cfg, 2).roi_heads.mask_head.target_aligned is cfg.model.roi_heads.mask_head.target_aligned
