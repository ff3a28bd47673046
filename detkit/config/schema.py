"""Typed config schema (pydantic). Every key a YAML file may set is declared here.

Two top-level configs exist: :class:`DetectionConfig` (``task: detection``, the
default) and :class:`ClassificationConfig` (``task: classification``, used by
``tools/pretrain_cls.py``). Unknown keys are errors (``extra="forbid"``).
"""

from __future__ import annotations

import difflib
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NormName = Literal["BN", "FrozenBN", "GN", "SyncBN", ""]

# The ResNet variants detkit builds (torchvision naming). The layering forbids ``config`` from
# importing ``models``, so this repeats the keys of ``detkit.models.backbones.resnet.ARCHS``;
# tests/test_config.py asserts the two stay equal.
RESNET_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


# The paper's CIFAR ResNets (classification only); repeats ``detkit.models.classifier.CIFAR_ARCHS``.
CIFAR_ARCHS: tuple[str, ...] = tuple(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202))

# The ResNet paper's shortcut options: A zero-padded identity, B projection where the shape changes
# (torchvision's ImageNet models, the default), C projection on every block.
ShortcutName = Literal["A", "B", "C"]


def check_arch(name: str, valid: tuple[str, ...] = RESNET_ARCHS) -> str:
    """``name`` if it is one of ``valid`` (:data:`RESNET_ARCHS`), else ValueError naming the nearest valid name."""
    if name in valid:
        return name
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown architecture {name!r}; {hint}valid names: {', '.join(valid)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model
class BackboneConfig(_Strict):
    name: str = "resnet50"  # one of RESNET_ARCHS (torchvision naming: resnet18 ... wide_resnet101_2)
    norm: NormName = "FrozenBN"
    # Detectron2's FREEZE_AT numbering: 0 freezes nothing, 1 the stem, k >= 2 the stem and res2..res{k}
    # (2, the default, freezes stem + res2; 5 freezes the whole backbone)
    freeze_at: int = Field(2, ge=0, le=5)
    stride_in_1x1: bool = False  # True for Caffe2/MSRA weights
    shortcut: ShortcutName = "B"  # paper's option; torchvision's weights load only into B
    zero_init_residual: bool = False
    out_features: list[str] = ["res2", "res3", "res4", "res5"]
    weights: Optional[str] = None  # pretrained classification weights (any load_weights format)

    @field_validator("name")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)


class FPNConfig(_Strict):
    out_channels: int = 256
    norm: NormName = ""
    top_block: Literal["maxpool", "p6p7", "none"] = "maxpool"


class AnchorConfig(_Strict):
    sizes: list[list[float]] = [[32], [64], [128], [256], [512]]
    aspect_ratios: list[list[float]] = [[0.5, 1.0, 2.0]]
    offset: float = 0.0  # 0.0 for torchvision/Detectron2 anchors
    round_base: bool = False  # torchvision rounds the base (cell) anchors to integers


class RPNConfig(_Strict):
    in_features: list[str] = ["p2", "p3", "p4", "p5", "p6"]
    num_convs: int = 1
    iou_thresholds: tuple[float, float] = (0.3, 0.7)
    allow_low_quality_matches: bool = True
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 1.0 / 9.0  # 0.0 means plain L1
    loss_weight: float = 1.0
    pre_nms_topk_train: int = 2000  # per level
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000  # per image
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0


class BoxHeadConfig(_Strict):
    type: Literal["2fc", "4conv1fc"] = "2fc"
    fc_dim: int = 1024
    conv_dim: int = 256
    norm: NormName = ""  # GN for 4conv1fc
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 0
    pooler_aligned: bool = True
    cls_agnostic_bbox_reg: bool = False
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 0.0  # 0.0 means plain L1
    # the FCs' initialization (FastRCNNConvFCHead): c2_xavier (Detectron2's XavierFill) or pytorch (nn.Linear's
    # defaults, torchvision's); training only: loaded weights replace either
    fc_init: Literal["c2_xavier", "pytorch"] = "c2_xavier"


class MaskHeadConfig(_Strict):
    num_conv: int = 4
    conv_dim: int = 256
    norm: NormName = ""
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    pooler_aligned: bool = True
    # the frame the mask targets are cropped in (MaskRCNNHead's target_aligned): false, torchvision's
    # roi_align(aligned=False); true, the aligned pooler's frame (Detectron2), pasted back with mask_paste=detectron2
    target_aligned: bool = False


class CascadeConfig(_Strict):
    """The stages of ``roi_heads.name: cascade`` (Detectron2's MODEL.ROI_BOX_CASCADE_HEAD): stage k matches
    its input boxes to the GT at ``iou_thresholds[k]`` and encodes its box targets with ``bbox_reg_weights[k]``."""

    iou_thresholds: list[float] = [0.5, 0.6, 0.7]
    bbox_reg_weights: list[tuple[float, float, float, float]] = [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]

    @model_validator(mode="after")
    def _one_entry_per_stage(self) -> "CascadeConfig":
        n, m = len(self.iou_thresholds), len(self.bbox_reg_weights)
        if n == 0 or n != m:
            raise ValueError(f"iou_thresholds has {n} stages but bbox_reg_weights has {m}; give both one entry "
                             "per cascade stage, e.g. iou_thresholds=[0.5,0.6,0.7] with three weight lists")
        if any(not 0.0 < t <= 1.0 for t in self.iou_thresholds):
            raise ValueError(f"iou_thresholds={self.iou_thresholds}: each stage's IoU threshold must be in (0, 1]")
        if any(w <= 0 for ws in self.bbox_reg_weights for w in ws):
            raise ValueError(f"bbox_reg_weights={[list(w) for w in self.bbox_reg_weights]}: weights must be > 0")
        return self


class ROIHeadsConfig(_Strict):
    # "standard": one box stage (Faster / Mask R-CNN); "cascade": Cascade R-CNN's stages (see ``cascade``),
    # each with its own 2fc/4conv1fc box head and a class-agnostic predictor (Detectron2's CascadeROIHeads)
    name: Literal["standard", "cascade"] = "standard"
    cascade: CascadeConfig = CascadeConfig()
    in_features: list[str] = ["p2", "p3", "p4", "p5"]
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    min_box_size_test: float = 1e-2
    canonical_box_size: int = 224
    canonical_level: int = 4
    box_head: BoxHeadConfig = BoxHeadConfig()
    mask_head: MaskHeadConfig = MaskHeadConfig()

    @model_validator(mode="after")
    def _cascade_settings(self) -> "ROIHeadsConfig":
        if self.name != "cascade":
            return self
        if not self.box_head.cls_agnostic_bbox_reg:
            raise ValueError("name=cascade needs box_head.cls_agnostic_bbox_reg=true (every cascade stage regresses "
                             "one box for all classes), got false; set model.roi_heads.box_head.cls_agnostic_bbox_reg: "
                             "true")
        if self.iou_threshold != self.cascade.iou_thresholds[0]:
            raise ValueError(f"name=cascade: iou_threshold={self.iou_threshold} differs from the first stage's "
                             f"cascade.iou_thresholds[0]={self.cascade.iou_thresholds[0]}; make them equal")
        return self


class ModelConfig(_Strict):
    meta_architecture: Literal["faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    num_classes: Optional[int] = None  # None: taken from the training data
    weights: Optional[str] = None  # full detector init (any load_weights format)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # in input_format order, 0-255 scale
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    input_format: Literal["RGB", "BGR"] = "RGB"  # channel order the backbone expects
    size_divisibility: int = 32
    backbone: BackboneConfig = BackboneConfig()
    fpn: FPNConfig = FPNConfig()
    anchors: AnchorConfig = AnchorConfig()
    rpn: RPNConfig = RPNConfig()
    roi_heads: ROIHeadsConfig = ROIHeadsConfig()
    mask_threshold: float = 0.5  # binarization threshold for pasted masks
    # how M x M mask probabilities are pasted into their boxes: "torchvision" (padded mask on the
    # integer-truncated enlarged box, > threshold) or "detectron2" (sampled at each pixel centre of the
    # exact float box, >= threshold), which the Detectron2 zoo configs use
    mask_paste: Literal["torchvision", "detectron2"] = "torchvision"


# --------------------------------------------------------------------------- data
class SplitConfig(_Strict):
    annotations: Optional[str] = None
    images: Optional[str] = None


class TrainSplitConfig(_Strict):
    """``data.train``: one COCO file and its images folder, or lists of them (several training sets,
    as Detectron2's ``DATASETS.TRAIN``), matched by position; classes are matched by name."""

    annotations: Optional[Union[str, list[str]]] = None
    images: Optional[Union[str, list[str]]] = None

    @model_validator(mode="after")
    def _one_folder_per_file(self) -> "TrainSplitConfig":
        a, i = self.annotations, self.images
        if isinstance(a, list) or isinstance(i, list):
            na = len(a) if isinstance(a, list) else int(a is not None)
            ni = len(i) if isinstance(i, list) else int(i is not None)
            if na != ni or na == 0:
                raise ValueError(f"annotations lists {na} file(s) but images {ni} folder(s); give one images folder "
                                 "per annotation file, e.g. annotations=[a.json,b.json] images=[a/,b/]")
        return self

    @property
    def annotation_files(self) -> list[str]:
        """The annotation files as a list (empty when unset)."""
        a = self.annotations
        return list(a) if isinstance(a, list) else ([a] if a else [])


class SyntheticDataConfig(_Strict):
    """Generate the embedded shapes dataset (detkit.data.synthetic) under ``root`` if missing.

    For detection: ``num_train``/``num_val`` images. For classification: images per class.
    """

    root: str = "datasets/shapes"
    num_train: int = 400
    num_val: int = 50
    image_size: int = 256
    seed: int = 0


class DataConfig(_Strict):
    synthetic: Optional[SyntheticDataConfig] = None  # when set, data.train/val point at the generated set
    train: TrainSplitConfig = TrainSplitConfig()
    val: SplitConfig = SplitConfig()
    filter_empty: bool = True  # drop training images without usable annotations
    # used when no annotations file is given (inference), and as the label space of several training
    # files whose classes differ (their union, in label order)
    class_names: Optional[list[str]] = None
    # the dataset's category id of each contiguous label, recorded by train_det so tools can write
    # COCO results (``category_id``) without the annotations file
    category_ids: Optional[list[int]] = None


class InputConfig(_Strict):
    min_size_train: Union[int, list[int]] = [640, 672, 704, 736, 768, 800]
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip_prob: float = 0.5
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter; 0 disables
    large_scale_jitter: bool = False
    lsj_image_size: int = 1024
    lsj_scale_range: tuple[float, float] = (0.1, 2.0)
    # shortest-edge resize: "opencv" (one scale, round half up, cv2 bilinear) or "detectron2" (its
    # two-step size rounding and PIL's bilinear, antialiased when shrinking), for the Detectron2 zoo configs
    resize_style: Literal["opencv", "detectron2"] = "opencv"


class DataLoaderConfig(_Strict):
    num_workers: int = 2
    aspect_ratio_grouping: bool = True


class DetectionDataLoaderConfig(DataLoaderConfig):
    # "training": every image once per epoch; "repeat_factor": LVIS repeat-factor sampling, images with rare
    # classes repeated (r(c) = max(1, sqrt(repeat_threshold / fraction of images with c)); Detectron2's
    # RepeatFactorTrainingSampler)
    sampler: Literal["training", "repeat_factor"] = "training"
    repeat_threshold: float = Field(0.001, gt=0.0, le=1.0)


class TrainConfig(_Strict):
    max_iters: int = 90000
    batch_size: int = 16  # total over all processes
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: Optional[float] = None  # None: same as weight_decay
    lr_schedule: Literal["multistep", "cosine"] = "multistep"
    steps: list[int] = [60000, 80000]
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 disables
    amp: Literal["none", "fp16", "bf16", "auto"] = "none"  # autocast; auto: bf16 where native, fp16 on old GPUs
    ema: bool = False
    ema_decay: float = 0.9998
    sync_bn: bool = False
    seed: int = 42
    eval_period: int = 0  # 0: only at the end
    checkpoint_period: int = 5000
    log_period: int = 20
    keep_last: int = 3
    vis_period: int = 0
    num_vis_images: int = 4


class TestConfig(_Strict):
    batch_size: int = 1
    # int8 (detkit.inference.int8, CPUs with VNNI/AMX-INT8; elsewhere the bf16/fp32 fallback): the Predictor, the tools,
    # and evaluation (eval_det and train_det calibrate on data.train, or read test.int8_quantized in eval_det)
    precision: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"  # fp16: CUDA GPUs (fp32 with a warning on CPU)
    # int8 (post-training static quantization of the backbone + FPN, RPN head and box FCs): images of data.train
    # calibrated on, the folder tools/quantize.py wrote (null: calibrate when the Predictor is made), and the
    # long-side steps of the padded input sizes compiled for (one static graph each, both orientations, on
    # first use; 4 at 800/1333: long sides 960, 1088, 1216, 1344; 2 padded COCO's 1199-wide images to 1344)
    int8_calibration_images: int = Field(32, ge=1)
    int8_quantized: Optional[str] = None
    int8_bucket_steps: int = Field(4, ge=1)
    # Predictor runtime: pytorch, or openvino (detkit's ONNX export compiled by OpenVINO: the [openvino] extra)
    runtime: Literal["pytorch", "openvino"] = "pytorch"
    eval_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"

    @model_validator(mode="after")
    def _int8_runs_on_pytorch(self) -> "TestConfig":
        if self.precision == "int8" and self.runtime == "openvino":
            raise ValueError("precision=int8 runs on the pytorch runtime (detkit.inference.int8); with runtime=openvino "
                             "set precision to fp32 or bf16, or set runtime=pytorch")
        return self


class DetectionConfig(_Strict):
    """Root of a detection config (``tools/train_det.py``, ``tools/eval_det.py``, Predictor)."""

    task: Literal["detection"] = "detection"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    input: InputConfig = InputConfig()
    dataloader: DetectionDataLoaderConfig = DetectionDataLoaderConfig()
    train: TrainConfig = TrainConfig()
    test: TestConfig = TestConfig()
    output_dir: str = "output"


# --------------------------------------------------------------------------- classification
class ClsModelConfig(_Strict):
    arch: str = "resnet18"  # one of RESNET_ARCHS, or CIFAR_ARCHS (cifar_resnet20 ... cifar_resnet1202)
    num_classes: Optional[int] = None  # None: number of class folders
    norm: NormName = "BN"
    shortcut: Optional[ShortcutName] = None  # None: the network's own (B for ImageNet ResNets, A for CIFAR)
    zero_init_residual: bool = True
    weights: Optional[str] = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v, RESNET_ARCHS + CIFAR_ARCHS)


class ClsInputConfig(_Strict):
    size: int = 224
    resize_ratio: float = 0.875  # val: resize shorter side to size / ratio, then center crop
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    hflip_prob: float = 0.5
    min_crop_scale: float = 0.08
    # train crop: "random_resized" (ImageNet: RandomResizedCrop(size, scale=(min_crop_scale, 1))) or
    # "pad_crop" (CIFAR: zero-pad crop_padding pixels on each side, then a random size x size crop)
    train_crop: Literal["random_resized", "pad_crop"] = "random_resized"
    crop_padding: int = Field(4, ge=0)


class ClsTrainConfig(_Strict):
    epochs: int = 90
    batch_size: int = 256  # total over all processes
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0
    lr_schedule: Literal["cosine", "multistep"] = "cosine"
    steps: list[int] = []  # multistep: iterations where the LR is multiplied by gamma
    gamma: float = 0.1
    max_iters: Optional[int] = Field(None, ge=1)  # the run's length in iterations instead of ``epochs`` (the last epoch may be partial)
    amp: Literal["none", "fp16", "bf16", "auto"] = "auto"  # auto: bf16 where native, fp16 on old GPUs, else fp32
    seed: int = 42
    log_period: int = 20

    @model_validator(mode="after")
    def _multistep_needs_steps(self) -> "ClsTrainConfig":
        if self.lr_schedule == "multistep" and (not self.steps or self.steps != sorted(set(self.steps))
                                                or self.steps[0] < 1):
            raise ValueError(f"train.steps={self.steps}: train.lr_schedule=multistep needs increasing positive "
                             "iterations, e.g. train.steps=[32000,48000]")
        return self


class ClsDataConfig(_Strict):
    synthetic: Optional[SyntheticDataConfig] = None  # generated shapes ImageFolder (per-class counts)
    train: Optional[str] = None  # ImageFolder root: <root>/<class>/<image>
    val: Optional[str] = None


class ClassificationConfig(_Strict):
    """Root of a classification pretraining config (``tools/pretrain_cls.py``)."""

    task: Literal["classification"] = "classification"
    model: ClsModelConfig = ClsModelConfig()
    data: ClsDataConfig = ClsDataConfig()
    input: ClsInputConfig = ClsInputConfig()
    dataloader: DataLoaderConfig = DataLoaderConfig()
    train: ClsTrainConfig = ClsTrainConfig()
    output_dir: str = "output"


Config = Union[DetectionConfig, ClassificationConfig]
