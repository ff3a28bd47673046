"""Export Faster / Mask R-CNN to TorchScript and ONNX, and check the exports against PyTorch.

* :mod:`.export`: the artifacts (:func:`export_torchscript`, :func:`export_onnx`, loaders,
  ``export.json``) and the steps of ``tools/export.py`` (option checks, the plain model, the
  traced sample image);
* :mod:`.verify`: an export run against the PyTorch model (:func:`verify_exports`, the box /
  score / mask agreement checks) and the images to run it on (:func:`verification_images`).

The exported graph is the detector's own inference code (:meth:`TwoStageDetector.predict`)
recorded with ``torch.jit.trace``; the model code keeps every size-dependent step in the
graph while tracing (``torch.jit.is_tracing()`` branches: traced image sizes, top-k with
``k = min(k, n)`` as a graph value, per-level RoIAlign without empty-level shortcuts, per-image
selection without host-side splits), so one export runs on any image size and on images with
zero detections.

Exported signature (both formats), one image per call::

    image  float32 [3, H, W]  RGB, 0..255, any H and W (resize like the Predictor first:
                              short side ``input.min_size_test``, long side <= ``input.max_size_test``)
    ->  boxes  float32 [N, 4]  xyxy in the input image's pixels
        scores float32 [N]     decreasing
        labels int64   [N]     contiguous class indices in [0, K)
        masks  float32 [N, 1, M, M]  (Mask R-CNN only) mask probabilities of the predicted class,
                                     not pasted: use :func:`paste_masks` (or
                                     ``paste_masks_in_image``) with the boxes and ``mask_threshold``.

Masks are returned before pasting because pasting loops over data-dependent box sizes on the
host, which a traced graph cannot express; the M x M probabilities are also 10-100x smaller
than full-image masks.

Example::

    model = build_detector(cfg, num_classes).eval()
    export_torchscript(model, "out/model.ts", sample)          # sample: float [3, H, W]
    export_onnx(model, "out/model.onnx", sample, opset=17)
    report = verify_exports(model, [img_a, img_b, blank], torchscript="out/model.ts", onnx="out/model.onnx")
    print(report.summary()); assert report.ok
"""

from .export import (
    DEFAULT_OPSET,
    FILE_NAMES,
    FORMATS,
    MIN_OPSET,
    ExportableDetector,
    ExportError,
    build_export_model,
    check_export_options,
    export_manifest,
    export_onnx,
    export_to,
    export_torchscript,
    load_onnx,
    load_torchscript,
    paste_masks,
    split_overrides,
    synthetic_scene,
    trace_size,
    write_manifest,
)
from .verify import (
    BackendCheck,
    VerificationImage,
    VerificationReport,
    blank_image,
    verification_images,
    verify_exports,
)

__all__ = [
    "DEFAULT_OPSET",
    "FILE_NAMES",
    "FORMATS",
    "MIN_OPSET",
    "BackendCheck",
    "ExportError",
    "ExportableDetector",
    "VerificationImage",
    "VerificationReport",
    "blank_image",
    "build_export_model",
    "check_export_options",
    "export_manifest",
    "export_onnx",
    "export_to",
    "export_torchscript",
    "load_onnx",
    "load_torchscript",
    "paste_masks",
    "split_overrides",
    "synthetic_scene",
    "trace_size",
    "verification_images",
    "verify_exports",
    "write_manifest",
]
