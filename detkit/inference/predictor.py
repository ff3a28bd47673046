"""High-level inference: ``Predictor(config, weights)(image) -> Prediction``.

Example::

    from detkit import Predictor
    predictor = Predictor("configs/torchvision/mask_rcnn_R_50_FPN.yaml", weights="maskrcnn.pth")
    result = predictor(image_rgb_uint8)          # numpy HxWx3, RGB (input_format="BGR" for cv2.imread arrays)
    for box, score, label in zip(result.boxes, result.scores, result.labels):
        print(predictor.class_names[label], score, box)
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..checkpoint import load_initial_weights
from ..config import DetectionConfig, load_config
from ..data.classes import resolve_classes
from ..data.transforms import build_detection_transform
from ..models.build import build_detector
from ..models.detector import rescale_detections
from ..structures import Detections
from ..export import trace_size
from ..layers import fold_frozen_bn
from .openvino import OpenVINODetector
from .optimize import optimize_for_inference, resolve_precision

__all__ = ["Predictor", "Prediction"]

logger = logging.getLogger("detkit")

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
RUNTIMES = ("pytorch", "openvino")


@dataclass
class Prediction:
    """Detections for one image, in that image's pixels, as CPU numpy arrays.

    Attributes:
        boxes: float32 [N, 4] xyxy.
        scores: float32 [N], sorted in decreasing order.
        labels: int64 [N], indices into ``Predictor.class_names``.
        masks: bool [N, H, W] instance masks for Mask R-CNN when they were asked for (``predict``'s
            ``masks``, default yes), else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


INPUT_FORMATS = ("RGB", "BGR")


def _check_image(image: Any, index: Optional[int] = None, input_format: str = "RGB") -> np.ndarray:
    """``image`` as the RGB uint8 HxWx3 array the model pipeline takes (channels reversed for ``"BGR"``)."""
    where = "image" if index is None else f"image {index}"
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = (
            f"dtype={image.dtype} shape={tuple(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        )
        raise ValueError(
            f"Predictor: {where} must be a uint8 HxWx3 {input_format} numpy array, got {desc}; convert it first "
            "(e.g. (img * 255).astype(np.uint8))"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Predictor: {where} is empty (shape {tuple(image.shape)})")
    return np.ascontiguousarray(image[..., ::-1]) if input_format == "BGR" else image


class Predictor:
    """Load a detector from a config (and weights) and run it on numpy images, RGB or (``input_format="BGR"``) BGR.

    The images given are RGB by default, as PIL, imageio and :func:`detkit.data.read_image` return them.
    People coming from Detectron2, whose ``DefaultPredictor`` takes ``cv2.imread`` arrays, pass
    ``input_format="BGR"``. Either way the model gets what its config asks for (``model.input_format``:
    a Detectron2 zoo model still sees BGR), so this argument only says what the caller holds.

    Images go through the evaluation pipeline's test-time transform
    (:func:`detkit.data.transforms.build_detection_transform` with ``is_train=False``: short side
    ``input.min_size_test``, long side at most ``input.max_size_test`` unless that is 0, bilinear),
    so the model sees what ``eval_det.py`` gives it; the detections are mapped back to the input
    image: boxes scaled, masks pasted at full resolution.

    A long-running CPU process that calls the Predictor many times gains 2-6 % from
    :func:`detkit.machine.keep_freed_memory` (freed activations reused instead of page-faulted in
    again). It tunes malloc for the whole process, so the Predictor leaves that choice to its
    caller; ``tools/infer.py``, ``serve.py``, ``eval_det.py``, ``benchmark.py`` and ``quantize.py`` opt in.

    Args:
        config: path of a YAML config, or a loaded :class:`DetectionConfig`.
        weights: any :func:`detkit.load_weights` source (path, state dict), or a name
            (``torchvision://...``, ``detectron2://...``, ``https://...``: :mod:`detkit.checkpoint.hub`,
            downloaded once into the verified cache); default ``model.weights`` of the config.
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA GPUs; fp32 with a warning elsewhere) or ``"int8"``
            (see ``quantized``); default ``test.precision`` of
            the config. bf16 stores
            weights and activations in bfloat16 with fp32 islands (RoIAlign coordinates, box
            decoding, NMS, predictors) where :func:`detkit.inference.optimize.bf16_supported` says the device
            runs it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs); float32 otherwise, with a warning.
        fold_bn: fold frozen / eval-mode BatchNorms into the preceding convolutions after loading
            (same results up to float rounding); the state dict then no longer matches a training
            checkpoint.
        optimize: run :func:`detkit.inference.optimize.optimize_for_inference` (folded BNs, channels_last, oneDNN
            linear layers and a multi-threaded RoIAlign on CPU, bf16 weights for ``precision="bf16"``;
            fp32 results equal up to float rounding). False keeps the plain modules (bf16 then uses
            autocast; int8 needs True).
        quantized: for ``precision="int8"`` (:mod:`detkit.inference.int8`: the backbone + FPN, RPN head and box FCs in int8, the
            rest in bf16 where native, else fp32; CPUs with VNNI or AMX-INT8, and torchao, else bf16 /
            fp32 with a warning): the folder ``tools/quantize.py`` or :meth:`save_quantized` wrote for
            these weights; default ``test.int8_quantized``; None: calibrate now.
        calibration: images to calibrate on (uint8 HxWx3 in ``input_format`` order, any size), or a number of
            ``data.train`` images; default ``test.int8_calibration_images``.
        runtime: ``"pytorch"``, or ``"openvino"``: the model exported to ONNX (:mod:`detkit.export`)
            and compiled by OpenVINO for the CPU (:class:`~detkit.inference.openvino.OpenVINODetector`,
            the ``[openvino]`` extra), fp32 or bf16; same resizing, mask pasting and outputs. Default
            ``test.runtime``.
        input_format: ``"RGB"`` (default) or ``"BGR"``: the channel order of the images passed to
            :meth:`__call__`, :meth:`predict` and ``calibration``.

    Attributes:
        cfg: the config.
        model: the :class:`TwoStageDetector` (eval mode).
        classes: the :class:`~detkit.data.classes.ClassInfo` of the model (names, category ids).
        class_names: name of each label.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``, the one in use.
        int8_state: the :class:`~detkit.inference.int8.Int8State` with int8, else None.
        transform: the test-time transform, built from ``cfg.input`` when the Predictor is made.
    """

    def __init__(
        self,
        config: Union[str, os.PathLike, DetectionConfig],
        weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
        device: Union[str, torch.device] = "cpu",
        precision: Optional[str] = None,
        fold_bn: bool = True,
        optimize: bool = True,
        quantized: Union[None, str, os.PathLike] = None,
        calibration: Union[None, int, Sequence[np.ndarray]] = None,
        runtime: Optional[str] = None,
        input_format: str = "RGB",
    ) -> None:
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"Predictor: input_format must be 'RGB' or 'BGR' (the channel order of the images you "
                             f"pass), got {input_format!r}")
        self.input_format = input_format
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"Predictor: precision must be one of {PRECISIONS}, got {precision!r}")
        if runtime is not None and runtime not in RUNTIMES:
            raise ValueError(f"Predictor: runtime must be one of {RUNTIMES}, got {runtime!r}")
        if isinstance(config, DetectionConfig):
            cfg = config.model_copy(deep=True)
        elif isinstance(config, (str, os.PathLike)):
            cfg = load_config(config)
            if not isinstance(cfg, DetectionConfig):
                raise ValueError(f"Predictor: {config} is a {cfg.task} config; a detection config is needed")
        else:
            raise TypeError(f"Predictor: config must be a path or a DetectionConfig, got {type(config).__name__}")

        self.classes = resolve_classes(cfg)
        self.class_names: list[str] = list(self.classes.names)
        self.cfg = cfg
        self.transform = build_detection_transform(cfg.input, is_train=False)
        self.device = torch.device(device)
        model = build_detector(cfg, self.classes.num_classes)
        load_initial_weights(model, cfg, weights, training=False, weights_key="Predictor(weights=...)")
        if weights is None and not cfg.model.weights:
            logger.warning("Predictor: no weights given (weights=None and model.weights unset): random %s",
                           "heads" if cfg.model.backbone.weights else "model")
        model.eval()
        self.model = model.to(self.device)
        self.precision = precision or cfg.test.precision
        self.runtime = runtime or cfg.test.runtime
        self.int8_state = None
        self._openvino: Optional[OpenVINODetector] = None
        if self.runtime == "openvino":
            if self.precision == "int8":
                raise ValueError("Predictor: runtime='openvino' runs fp32 or bf16; int8 is the PyTorch runtime's "
                                 "(set precision='bf16' or runtime='pytorch')")
            self.precision = resolve_precision(self.precision, self.device)
            fold_frozen_bn(self.model)  # a smaller graph; the PyTorch model stays available as .model
            self._openvino = OpenVINODetector(self.model, self.precision, sample_size=trace_size(cfg))
        else:
            self._prepare_pytorch(optimize, fold_bn, quantized, calibration)
        # bf16 through autocast only for the unoptimized PyTorch model (OpenVINO picks its own precision)
        self._autocast = self.precision in ("bf16", "fp16") and not optimize and self._openvino is None

    def _prepare_pytorch(self, optimize: bool, fold_bn: bool, quantized: Union[None, str, os.PathLike],
                         calibration: Union[None, int, Sequence[np.ndarray]]) -> None:
        """Optimize ``self.model`` for ``self.precision`` (int8: quantize its backbone first)."""
        if self.precision == "int8":
            from .int8 import resolve_int8

            self.precision = resolve_int8(self.device)
        if self.precision == "int8":
            from .int8 import int8_model

            if not optimize:
                raise ValueError("Predictor: precision='int8' needs optimize=True")
            calibration = calibration if calibration is None or isinstance(calibration, int) else \
                [self.transform(_check_image(im, i, self.input_format)).image for i, im in enumerate(calibration)]
            self.int8_state, rest = int8_model(self.model, self.cfg, quantized or self.cfg.test.int8_quantized,
                                               calibration)
            optimize_for_inference(self.model, rest, fold_bn=fold_bn)
            return
        self.precision = resolve_precision(self.precision, self.device)
        if optimize:
            optimize_for_inference(self.model, self.precision, fold_bn=fold_bn)
        elif fold_bn:
            fold_frozen_bn(self.model)

    def save_quantized(self, path: Union[str, os.PathLike]) -> None:
        """Write the int8 calibration (:func:`detkit.inference.int8.save_quantized`) to the folder ``path``."""
        if self.int8_state is None:
            raise ValueError(f"Predictor.save_quantized: precision is {self.precision!r}, not 'int8'")
        from .int8 import save_quantized

        save_quantized(self.int8_state, path, {"buckets_compiled": sorted(self.model.backbone.compile_seconds)})

    def _context(self) -> contextlib.AbstractContextManager:
        if self._autocast:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def __call__(self, image: np.ndarray, masks: bool = True) -> Prediction:
        """Detect objects in one uint8 HxWx3 image, RGB unless ``input_format="BGR"`` (``masks``: as in
        :meth:`predict`)."""
        return self.predict([image], masks=masks)[0]

    def predict(self, images: Sequence[np.ndarray], masks: Union[bool, Sequence[bool]] = True) -> list[Prediction]:
        """Detect objects in a list of uint8 HxWx3 images, RGB unless ``input_format="BGR"``.

        Up to ``test.batch_size`` images go through the model per call, grouped by their size after
        resizing: a batch only holds images of one size, so no image is padded for another one and
        every result equals what ``predictor(image)`` gives.

        ``masks``: paste Mask R-CNN's instance masks at the image's resolution (``Prediction.masks``),
        for every image or, as a list, per image. Without them ``Prediction.masks`` is None and the
        memory they take is never allocated: an image's masks are N x H x W booleans, about 2.5 GB for
        100 detections on a 25-megapixel image.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError("Predictor.predict: expects a list of images; use predictor(image) for one image")
        images = [_check_image(im, i, self.input_format) for i, im in enumerate(images)]
        want_masks = [bool(masks)] * len(images) if isinstance(masks, (bool, np.bool_)) else [bool(m) for m in masks]
        if len(want_masks) != len(images):
            raise ValueError(f"Predictor.predict: masks has {len(want_masks)} flags for {len(images)} images")
        batch = max(int(self.cfg.test.batch_size), 1)
        resized = [self.transform(im).image for im in images]  # H' x W' x 3 uint8
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(resized):
            by_size.setdefault(r.shape, []).append(i)
        results: list[Optional[Prediction]] = [None] * len(images)
        for indices in by_size.values():
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                for i, det in zip(chunk, self._run([resized[i] for i in chunk])):
                    if not want_masks[i]:
                        det = replace(det, masks=None)  # never pasted
                    results[i] = self._to_prediction(det, resized[i].shape[:2], images[i].shape[:2])
        return results  # type: ignore[return-value]

    def _run(self, resized: list[np.ndarray]) -> list[Detections]:
        """One model call on same-size resized images; detections in their pixels, masks unpasted."""
        # (H', W', 3) -> (3, H', W') uint8, laid out as the evaluation dataset does
        tensors = [torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1))).to(self.device) for r in resized]
        with torch.inference_mode(), self._context():
            return (self._openvino or self.model).predict(tensors, paste_masks=False)

    def _to_prediction(self, det: Detections, resized_hw: tuple[int, int], image_hw: tuple[int, int]) -> Prediction:
        with torch.inference_mode():
            det = rescale_detections(det, resized_hw, image_hw, self.model.mask_threshold, self.model.mask_paste)
        return Prediction(
            boxes=det.boxes.float().cpu().numpy(),
            scores=det.scores.float().cpu().numpy(),
            labels=det.labels.cpu().numpy().astype(np.int64),
            masks=None if det.masks is None else det.masks.cpu().numpy().astype(bool),
        )
