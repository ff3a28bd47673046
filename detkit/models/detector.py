"""Two-stage detector (Faster / Mask R-CNN): normalize and pad the images, then backbone -> RPN -> RoI heads."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structures import Detections, Targets, clip_boxes_to_image
from .roi_heads.mask_head import paste_masks as _paste_masks  # predict() has a paste_masks flag

__all__ = ["TwoStageDetector", "rescale_detections"]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode (BN statistics frozen, test-time top-k)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def rescale_detections(
    det: Detections, from_size: tuple[int, int], to_size: tuple[int, int], mask_threshold: float = 0.5,
    mask_paste: str = "torchvision",
) -> Detections:
    """Map detections from the image the model saw to another size (e.g. the original image).

    Boxes are scaled per axis by ``to / from`` and clipped to ``to_size``. Unpasted mask
    probabilities ``[N, 1, M, M]`` are pasted at ``to_size`` (bool ``[N, H, W]``) with the
    rescaled boxes; already-pasted bool masks ``[N, h, w]`` are resized (nearest).

    Args:
        det: detections in ``from_size`` pixels.
        from_size: ``(h, w)`` of the image the detections are in.
        to_size: ``(H, W)`` of the target image.
        mask_threshold: binarization threshold for pasting.
        mask_paste: ``"torchvision"`` or ``"detectron2"`` pasting (:func:`paste_masks`).
    """
    (fh, fw), (th, tw) = from_size, to_size
    if min(fh, fw, th, tw) <= 0:
        raise ValueError(f"rescale_detections: sizes must be positive, got from_size={from_size} to_size={to_size}")
    factors = det.boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])
    boxes = clip_boxes_to_image(det.boxes * factors, (th, tw))
    masks = det.masks
    if masks is not None:
        if masks.dim() == 4:
            masks = _paste_masks(masks, boxes, (th, tw), mask_threshold, mask_paste)
        elif masks.dim() == 3 and tuple(masks.shape[-2:]) != (th, tw):
            if masks.shape[0] == 0:
                masks = masks.new_zeros((0, th, tw))
            else:
                # (N, h, w) -> (1, N, h, w) -> (N, H, W)
                masks = F.interpolate(masks[None].float(), size=(th, tw), mode="nearest")[0] > 0.5
    return Detections(boxes=boxes, scores=det.scores, labels=det.labels, masks=masks)


class TwoStageDetector(nn.Module):
    """Faster R-CNN (no mask head) or Mask R-CNN.

    Args:
        backbone: images [N, 3, Hp, Wp] -> feature maps by name (e.g. ``BackboneWithFPN``).
        rpn: :class:`detkit.models.rpn.RPN`.
        roi_heads: :class:`detkit.models.roi_heads.StandardROIHeads`.
        pixel_mean, pixel_std: per-channel normalization on the 0..255 scale, in the channel order
            given by ``input_format`` (what the backbone sees).
        input_format: ``"RGB"`` or ``"BGR"``: channel order the backbone expects. Input images are
            always RGB; they are reordered for ``"BGR"``.
        size_divisibility: the normalized batch is zero-padded to a multiple of this.
        mask_threshold: binarization threshold when pasting masks.
        mask_paste: ``"torchvision"`` or ``"detectron2"``: how masks are pasted into their boxes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisibility: int = 32,
        mask_threshold: float = 0.5,
        mask_paste: str = "torchvision",
    ) -> None:
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"TwoStageDetector: input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(
                f"TwoStageDetector: pixel_mean/pixel_std need 3 values (std > 0), got {pixel_mean} / {pixel_std}"
            )
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.input_format = input_format
        self.size_divisibility = int(size_divisibility)
        self.mask_threshold = float(mask_threshold)
        if mask_paste not in ("torchvision", "detectron2"):
            raise ValueError(f"TwoStageDetector: mask_paste must be 'torchvision' or 'detectron2', got {mask_paste!r}")
        self.mask_paste = mask_paste
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters and buffers."""
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return int(self.roi_heads.num_classes)

    def class_layers(self) -> tuple[str, ...]:
        """Names of the submodules whose shapes depend on the number of classes: what weights of a
        model with another class count leave re-initialized (see :func:`detkit.checkpoint.check_fit`)."""
        layers = ["roi_heads.box_predictor"]
        if getattr(self.roi_heads, "mask_head", None) is not None:
            layers.append("roi_heads.mask_head.predictor")
        return tuple(layers)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalize RGB 0..255 images and zero-pad them into one batch.

        Args:
            images: list of [3, H_i, W_i] uint8 or float tensors, RGB, values 0..255.

        Returns:
            float [N, 3, Hp, Wp] batch (Hp, Wp multiples of ``size_divisibility``) and the
            ``(H_i, W_i)`` of each image.
        """
        if len(images) == 0:
            raise ValueError("TwoStageDetector: got an empty list of images; pass at least one [3, H, W] tensor")
        sizes: list[tuple[int, int]] = []
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 or min(im.shape[1:]) <= 0:
                shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"TwoStageDetector: image {i} must be a [3, H, W] RGB tensor with H, W > 0, got {shape}")
            sizes.append((int(im.shape[1]), int(im.shape[2])))
        d = max(self.size_divisibility, 1)
        if torch.jit.is_tracing():
            return self._preprocess_traced(images, d)
        max_h = int(math.ceil(max(h for h, _ in sizes) / d) * d)
        max_w = int(math.ceil(max(w for _, w in sizes) / d) * d)
        batch = self.pixel_mean.new_zeros((len(images), 3, max_h, max_w))
        for i, im in enumerate(images):
            x = im.to(device=self.device, dtype=torch.float32, non_blocking=True)
            if self.input_format == "BGR":
                x = x.flip(0)
            h, w = sizes[i]
            batch[i, :, :h, :w] = (x - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def _preprocess_traced(self, images: Sequence[Tensor], d: int) -> tuple[Tensor, list[tuple[int, int]]]:
        """:meth:`preprocess` for ``torch.jit.trace`` / ONNX export: image sizes stay traced 0-dim
        tensors (Python ints would freeze the sample's size into the graph) and padding uses ``F.pad``."""
        sizes = [(im.shape[1], im.shape[2]) for im in images]  # 0-dim tensors while tracing
        hs = torch.stack([torch.as_tensor(h) for h, _ in sizes])
        ws = torch.stack([torch.as_tensor(w) for _, w in sizes])
        # ceil in float, not integer division: OpenVINO's ONNX Div of int64 tensors rounds (159 / 32 -> 5)
        # where ONNX truncates, which padded every image by up to one extra stride there
        max_h = torch.ceil(hs.max().to(torch.float32) / d).to(torch.int64) * d
        max_w = torch.ceil(ws.max().to(torch.float32) / d).to(torch.int64) * d
        padded = []
        for im, (h, w) in zip(images, sizes):
            x = im.to(device=self.device, dtype=torch.float32)
            if self.input_format == "BGR":
                x = x.flip(0)
            x = (x - self.pixel_mean) / self.pixel_std
            padded.append(F.pad(x, (0, max_w - w, 0, max_h - h)))  # (3, h, w) -> (3, Hp, Wp)
        return torch.stack(padded), sizes

    # ------------------------------------------------------------------ training
    def forward(self, images: Sequence[Tensor], targets: Sequence[Targets]) -> dict[str, Tensor]:
        """Training losses.

        Args:
            images: list of [3, H_i, W_i] RGB images (0..255), already resized.
            targets: one :class:`Targets` per image, in that image's pixels.

        Returns:
            dict of scalar losses: ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``
            (and ``loss_mask`` for Mask R-CNN).
        """
        if targets is None or len(targets) != len(images):
            n_t = "None" if targets is None else len(targets)
            raise ValueError(
                f"TwoStageDetector.forward: got {len(images)} images and {n_t} targets; give one Targets per image "
                "(use predict() for inference)"
            )
        targets = [t.to(self.device) for t in targets]
        for i, t in enumerate(targets):
            if len(t) > 0:
                wh = t.boxes[:, 2:] - t.boxes[:, :2]
                bad = ~((wh > 0).all(dim=1) & torch.isfinite(t.boxes).all(dim=1))
                if bool(bad.any()):
                    j = int(torch.nonzero(bad)[0])
                    raise AssertionError(
                        f"TwoStageDetector.forward: image {i} has a GT box with zero/negative size or non-finite "
                        f"coordinates: index {j}, box {t.boxes[j].tolist()} (xyxy); filter such boxes in the data"
                    )
        x, sizes = self.preprocess(images)
        features = self.backbone(x)
        proposals, losses = self.rpn(sizes, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        losses.update(roi_losses)
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Sequence[Tensor], paste_masks: bool = True) -> list[Detections]:
        """Detections for each image, in that image's pixels.

        Runs in eval mode (restoring the previous mode afterwards) without gradients.

        Args:
            images: list of [3, H_i, W_i] RGB images (0..255).
            paste_masks: paste Mask R-CNN masks into bool [N, H_i, W_i]; if False, ``masks``
                holds float [N, 1, M, M] probabilities (see :func:`rescale_detections`).
        """
        if len(images) == 0:
            return []
        with _eval_mode(self):
            x, sizes = self.preprocess(images)
            features = self.backbone(x)
            proposals, _ = self.rpn(sizes, features, None)
            detections, _ = self.roi_heads(features, proposals, sizes, None)
        out = []
        for det, size in zip(detections, sizes):
            det = Detections(boxes=det.boxes.float(), scores=det.scores.float(), labels=det.labels, masks=det.masks)
            if paste_masks and det.masks is not None and det.masks.dim() == 4:
                det.masks = _paste_masks(det.masks, det.boxes, size, self.mask_threshold, self.mask_paste)
            out.append(det)
        return out
