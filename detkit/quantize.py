"""int8 inference: post-training static quantization of the backbone + FPN (PT2E, x86 quantizer, inductor).

PyTorch's own flow (torchao's PT2E): the fp32 backbone+FPN (BatchNorms folded) is exported with
``torch.export``, annotated by ``X86InductorQuantizer`` (int8 activations per tensor, int8 weights
per channel; conv+ReLU and conv+add+ReLU fused), calibrated on images of the training set through the
test-time transform (:func:`calibration_images`), converted (``convert_pt2e``) and lowered by
``torch.compile`` (inductor with freezing), which turns the quantize/dequantize pattern into oneDNN
int8 convolutions (VNNI / AMX-INT8). The RPN, the RoI heads and everything after run as
:func:`detkit.speed.optimize_for_inference` makes them (bf16 where the CPU runs it natively, else fp32).

Image sizes: dynamic-shape lowering was measured 1.6x slower than static (R50-FPN, 800x1216), so
each padded input is zero-padded further to a *size bucket* (:func:`size_buckets`: the short side
of ``input.min_size_test``, long sides between it and ``input.max_size_test``, both orientations),
one static graph per bucket is compiled on first use, and the features are cropped back to the sizes
the unbucketed input gives (the RPN sees the same anchors as in fp32; only features near the
bottom/right border see the extra zeros). Inputs no bucket holds get a bucket of their own.

Saved form (:func:`save_quantized` / :func:`load_quantized`): the observers' statistics (what
calibration computed: histograms, min/max) and a fingerprint of the fp32 weights they belong to, in a
``torch.save`` file read back with ``torch.load(weights_only=True)`` (tensors, strings, numbers and
dicts only: no code, no pickled classes), plus a ``manifest.json``. Loading re-exports the model
given to the Predictor, checks the fingerprint, loads the statistics and converts: the int8 weights
are recomputed from the same fp32 weights, so a reload gives the same detections bit for bit.
(``torch.export.save``/``load`` were not used: ``torch.export.load`` unpickles its weights and
constants with ``weights_only=False``.)

Layer 4 (beside speed, below the Predictor that imports it): imports config, machine, layers and data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DetectionConfig
from .errors import DetkitError
from .machine import bf16_supported, cpu_flags

__all__ = [
    "INT8_FLAGS", "FORMAT", "QuantizationError", "Int8State", "Int8Backbone", "torchao_available",
    "int8_supported", "calibration_images", "size_buckets", "weights_fingerprint", "calibrate_backbone",
    "quantize_backbone", "save_quantized", "load_quantized", "resolve_int8", "int8_model",
]

logger = logging.getLogger("detkit")

#: CPU flags of int8 dot-product instructions oneDNN's int8 convolutions use
INT8_FLAGS: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni")
FORMAT = "detkit-int8-observers/1"
_FILE, _MANIFEST = "int8_observers.pt", "manifest.json"
_OBSERVER = "activation_post_process_"


class QuantizationError(DetkitError, ValueError):
    """An int8 file or input is unusable; the message names the file and what to do."""


def torchao_available() -> bool:
    """Whether torchao (PT2E quantization, ``pip install detkit[int8]``) can be imported."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:
        return False
    return True


def int8_supported(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether int8 inference runs fast here: a CPU with AVX512-VNNI, AVX-VNNI or AMX-INT8, oneDNN and
    torchao. ``DETKIT_DISABLE_INT8=1`` forces False."""
    if torch.device(device).type != "cpu" or os.environ.get("DETKIT_DISABLE_INT8", "") == "1":
        return False
    if not (set(INT8_FLAGS) & cpu_flags()) or not torch.backends.mkldnn.is_available():
        return False
    return torchao_available()


def calibration_images(cfg: DetectionConfig, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` images of ``data.train`` (a seeded random choice; all of them if fewer) through the
    test-time transform: uint8 HxWx3 RGB at the size the Predictor feeds the model."""
    from .data.coco import load_coco
    from .data.images import read_image
    from .data.transforms import build_detection_transform

    if n <= 0:
        raise QuantizationError(f"calibration needs at least one image, got n={n}")
    train = cfg.data.train
    if not train.annotations or not train.images:
        raise QuantizationError("calibration images come from data.train.annotations / data.train.images, "
                                "which are not set in the config; set them or pass images")
    records = load_coco(train.annotations, train.images, filter_empty=False, is_train=False).records
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    transform = build_detection_transform(cfg.input, is_train=False)
    return [transform(read_image(records[i].path)).image for i in sorted(order)]


def size_buckets(min_size: int, max_size: int, divisibility: int, steps: int = 2) -> list[tuple[int, int]]:
    """Padded ``(H, W)`` input sizes compiled for: short side ``min_size`` rounded up to
    ``divisibility``, long sides ``steps`` evenly spaced sizes up to ``max_size`` (``4 * min_size``
    when it is 0), landscape then portrait."""
    d = max(int(divisibility), 1)
    short = math.ceil(min_size / d) * d
    longest = math.ceil((max_size if max_size > 0 else 4 * min_size) / d) * d
    longs = sorted({math.ceil((short + (longest - short) * k / steps) / d) * d for k in range(1, steps + 1)})
    return [(short, w) for w in longs] + [(w, short) for w in longs]


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and values), 16 hex digits."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Int8State:
    """What calibration computed: the observers' state and the weights it belongs to.

    Attributes:
        observers: ``activation_post_process_*`` buffers of the prepared backbone graph.
        fingerprint: :func:`weights_fingerprint` of the fp32 backbone (before BN folding).
        meta: JSON-able facts (images, seconds, versions) for the manifest.
        source: the file it was read from, or ``"calibration"``.
    """

    observers: dict[str, Tensor]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "calibration"


class _Features(nn.Module):
    """The backbone with a tuple output (what ``torch.export`` and the quantizer need)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(x).values())


def _export(backbone: nn.Module, example: Tensor, dynamic: bool, d: int) -> torch.fx.GraphModule:
    from torch.export import Dim

    shapes = None
    if dynamic:  # H, W multiples of d (what the detector's padding gives), >= 2d
        shapes = {"x": {2: d * Dim("h", min=2, max=4096), 3: d * Dim("w", min=2, max=4096)}}
    try:
        gm = torch.export.export(_Features(backbone), (example,), dynamic_shapes=shapes, strict=False).module()
    except Exception as e:  # noqa: BLE001 - one line naming the cause
        raise QuantizationError(f"int8: torch.export of the backbone failed ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from e
    # Non-strict export leaves one source partition per module, so a ReLU module a block calls twice
    # would be one partition with two outputs, which the x86 quantizer rejects: one per call instead.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
            node.meta["source_fn_stack"] = [(node.name, nn.ReLU)]
    return gm


def _prepare(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    return prepare_pt2e(gm, quantizer)


def _pad_to(x: Tensor, h: int, w: int) -> Tensor:
    return x if tuple(x.shape[-2:]) == (h, w) else F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def _observers(prepared: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """The observer modules of a prepared graph by the name of the node they observe (names are the
    same in the dynamic-shape calibration graph and the static graphs of the buckets)."""
    out: dict[str, nn.Module] = {}
    for n in prepared.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(_OBSERVER):
            out.setdefault(n.args[0].name, prepared.get_submodule(n.target))
    return out


#: ops whose output values are among their first input's: a static graph observes their outputs, the
#: dynamic-shape calibration graph may not (upsample_nearest2d.vec); they take their input's statistics
_VALUE_PRESERVING = ("upsample_nearest2d", "max_pool2d", "_to_copy", "clone", "contiguous")


def _load_observers(prepared: torch.fx.GraphModule, state: Int8State) -> None:
    """Load ``state`` into the observers of ``prepared`` (a static graph of a bucket)."""
    saved: dict[str, dict[str, Tensor]] = {}
    for key, v in state.observers.items():
        node, _, buf = key.rpartition(".")
        saved.setdefault(node, {})[buf] = v
    nodes = {n.name: n for n in prepared.graph.nodes}
    for name, obs in _observers(prepared).items():
        src, node = name, nodes[name]
        while src not in saved and any(op in str(node.target) for op in _VALUE_PRESERVING):
            node = node.args[0]
            src = node.name
        if src not in saved:
            raise QuantizationError(
                f"int8: {state.source} has no statistics for {name!r} of this backbone's graph: another "
                "architecture or torch/torchao version; quantize again")
        try:
            obs.load_state_dict(saved[src])
        except RuntimeError as e:
            raise QuantizationError(f"int8: {state.source}: statistics of {name!r} do not fit "
                                    f"({str(e).splitlines()[0]}); quantize again") from None


def calibrate_backbone(model: nn.Module, images: Sequence[Any], fingerprint: str) -> Int8State:
    """Observe the activations of ``model.backbone`` (fp32, BNs folded) on ``images`` (uint8 HxWx3
    RGB arrays at test size, or [3, H, W] tensors), through the detector's own preprocessing."""
    if not images:
        raise QuantizationError("calibration needs at least one image")
    d = max(int(model.size_divisibility), 32)
    t0 = time.perf_counter()
    batches = [model.preprocess([_as_tensor(im)])[0] for im in images]
    batches = [_pad_to(b, max(b.shape[2], 2 * d), max(b.shape[3], 2 * d)) for b in batches]
    prepared = _prepare(_export(model.backbone, batches[0], True, d))
    with torch.no_grad():
        for b in batches:
            prepared(b)
    observers = {f"{node}.{k}": v.detach().clone() for node, obs in _observers(prepared).items()
                 for k, v in obs.state_dict().items()}
    meta = {"calibration_images": len(batches), "calibration_s": round(time.perf_counter() - t0, 2)}
    return Int8State(observers, fingerprint, meta)


def _as_tensor(im: Any) -> Tensor:
    if isinstance(im, Tensor):
        return im
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


class Int8Backbone(nn.Module):
    """Runs the int8 backbone+FPN: one compiled static graph per size bucket, built on first use.

    Inputs are zero-padded to the smallest bucket holding them and the features cropped back to
    ``ceil(size / stride)``; outputs are channels_last in ``out_dtype``. It holds no parameters of
    its own (``optimize_for_inference`` leaves it as it is); ``compile_seconds`` maps each compiled
    bucket to its export + convert + compile + first-run time.
    """

    def __init__(self, backbone: nn.Module, state: Int8State, buckets: Sequence[tuple[int, int]],
                 divisibility: int, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.output_specs = dict(backbone.output_specs)
        self.buckets = sorted({tuple(int(v) for v in b) for b in buckets}, key=lambda b: b[0] * b[1])
        self.divisibility, self.out_dtype, self.state = max(int(divisibility), 32), out_dtype, state
        self._fp32 = [backbone]  # a list: not a submodule (no parameters to convert or to save)
        self._graphs: dict[tuple[int, int], Any] = {}
        self.compile_seconds: dict[tuple[int, int], float] = {}

    @property
    def size_divisibility(self) -> int:
        return max(s.stride for s in self.output_specs.values())

    def bucket_for(self, h: int, w: int) -> tuple[int, int]:
        """The smallest bucket holding an ``h`` x ``w`` input (a new one when none does)."""
        fits = [b for b in self.buckets if b[0] >= h and b[1] >= w]
        if fits:
            return fits[0]
        d = self.divisibility
        new = (max(math.ceil(h / d) * d, 2 * d), max(math.ceil(w / d) * d, 2 * d))
        logger.info("int8: input %dx%d fits no size bucket; adding %dx%d", h, w, *new)
        self.buckets = sorted([*self.buckets, new], key=lambda b: b[0] * b[1])
        return new

    def graph(self, bucket: tuple[int, int]) -> Any:
        """The compiled int8 graph of ``bucket`` (export, load observers, convert, compile, run once)."""
        if bucket in self._graphs:
            return self._graphs[bucket]
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        t0 = time.perf_counter()
        example = torch.zeros(1, 3, *bucket)
        prepared = _prepare(_export(self._fp32[0], example, False, self.divisibility))
        _load_observers(prepared, self.state)
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted, dynamic=False)
        # freezing (weights as constants) lets inductor prepack the int8 weights and fuse the
        # quantize / dequantize pattern into oneDNN int8 convolutions; compiling happens in this call
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            compiled(example)
        self._graphs[bucket] = compiled
        self.compile_seconds[bucket] = round(time.perf_counter() - t0, 2)
        logger.info("int8: compiled the backbone for %dx%d inputs in %.1f s", *bucket, self.compile_seconds[bucket])
        return compiled

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """[N, 3, H, W] -> ``{p_k: [N, C, ceil(H / 2^k), ceil(W / 2^k)]}``."""
        h, w = int(x.shape[2]), int(x.shape[3])
        bh, bw = self.bucket_for(h, w)
        run = self.graph((bh, bw))
        # freezing here too: a call in another grad mode than the first (no_grad vs inference_mode)
        # recompiles, and without freezing that graph would run fp32 convolutions on dequantized weights
        with torch._inductor.config.patch(freezing=True):
            outs = [run(_pad_to(x[i : i + 1].float(), bh, bw)) for i in range(x.shape[0])]
        feats = {}
        for k, (name, spec) in enumerate(self.output_specs.items()):
            s = spec.stride
            f = torch.cat([o[k] for o in outs]) if len(outs) > 1 else outs[0][k]
            f = f[:, :, : math.ceil(h / s), : math.ceil(w / s)]
            feats[name] = f.to(dtype=self.out_dtype, memory_format=torch.channels_last)
        return feats

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}, compiled={sorted(self._graphs)}, out_dtype={self.out_dtype}"


def quantize_backbone(model: nn.Module, state: Int8State, buckets: Sequence[tuple[int, int]],
                      out_dtype: torch.dtype = torch.float32) -> Int8Backbone:
    """Replace ``model.backbone`` (eval, fp32, BNs folded) by an :class:`Int8Backbone`, in place."""
    model.backbone = Int8Backbone(model.backbone, state, buckets, model.size_divisibility, out_dtype)
    return model.backbone


def _versions() -> dict[str, str]:
    import torchao

    return {"torch": torch.__version__, "torchao": getattr(torchao, "__version__", "?")}


def save_quantized(state: Int8State, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> Path:
    """Write ``path/int8_observers.pt`` (tensors and strings only) and ``path/manifest.json``; returns the file."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**state.meta, **_versions(), **(extra or {})}
    torch.save({"format": FORMAT, "fingerprint": state.fingerprint, "observers": state.observers,
                "meta": json.dumps(meta)}, out / _FILE)
    manifest = {"format": FORMAT, "file": _FILE, "fingerprint": state.fingerprint,
                "observer_tensors": len(state.observers), **meta}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out / _FILE


def load_quantized(path: Union[str, os.PathLike], fingerprint: Optional[str] = None) -> Int8State:
    """Read what :func:`save_quantized` wrote (a folder or its ``int8_observers.pt``) safely
    (``weights_only=True``); ``fingerprint``: that of the weights in use, checked against the file's."""
    p = Path(path)
    file = p / _FILE if p.is_dir() else p
    if not file.is_file():
        raise QuantizationError(f"int8: quantized file {file} not found; write it with tools/quantize.py")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line naming it
        raise QuantizationError(f"int8: cannot read {file} ({type(e).__name__}); write it again with "
                                "tools/quantize.py") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("observers"), dict):
        raise QuantizationError(f"int8: {file} is not a detkit int8 file (format {FORMAT})")
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        raise QuantizationError(f"int8: {file} was calibrated for other weights (fingerprint "
                                f"{data.get('fingerprint')}, these are {fingerprint}); quantize these weights")
    return Int8State(dict(data["observers"]), str(data["fingerprint"]), json.loads(data.get("meta") or "{}"), str(file))


def resolve_int8(device: Union[str, torch.device] = "cpu") -> str:
    """``"int8"`` where :func:`int8_supported`, else (one warning) ``"bf16"`` where that is native, else ``"fp32"``."""
    if int8_supported(device):
        return "int8"
    fallback = "bf16" if bf16_supported(device) else "fp32"
    why = ("torchao is not installed (pip install 'detkit[int8]')" if not torchao_available() else
           f"{torch.device(device)} has no int8 dot-product instructions (needs a CPU with {'/'.join(INT8_FLAGS)})")
    logger.warning("int8 inference is not available: %s; running in %s", why, fallback)
    return fallback


def int8_model(model: nn.Module, cfg: DetectionConfig, quantized: Union[None, str, os.PathLike] = None,
               calibration: Union[None, int, Sequence[Any]] = None) -> tuple[Int8State, str]:
    """Make ``model`` (eval, fp32, weights loaded, on CPU) an int8-backbone model, in place.

    The statistics come from ``quantized`` (a :func:`save_quantized` folder, checked against the
    weights), else from calibrating on ``calibration`` (images, or a number of ``data.train``
    images; default ``test.int8_calibration_images``). Returns the state and the precision the rest
    of the model should run in (``"bf16"`` where native, else ``"fp32"``).
    """
    from .layers import fold_frozen_bn

    fingerprint = weights_fingerprint(model.backbone)
    fold_frozen_bn(model.backbone)
    if quantized is not None:
        state = load_quantized(quantized, fingerprint)
    else:
        images = calibration if calibration is not None else cfg.test.int8_calibration_images
        if isinstance(images, int):
            images = calibration_images(cfg, images)
        state = calibrate_backbone(model, images, fingerprint)
    rest = "bf16" if bf16_supported("cpu") else "fp32"
    buckets = size_buckets(cfg.input.min_size_test, cfg.input.max_size_test, model.size_divisibility,
                           cfg.test.int8_bucket_steps)
    quantize_backbone(model, state, buckets, torch.bfloat16 if rest == "bf16" else torch.float32)
    return state, rest
