"""Swin as a general-purpose backbone: semantic segmentation (UPerNet) and detection / instance
segmentation (torchvision's Faster / Mask R-CNN), in plain PyTorch, and their ONNX exports."""

from .backbone import SwinBackbone, create_backbone
from .config import DetectionConfig, SegmentationConfig, resolve_dense_config
from .detection import SwinFPN, build_detector, create_detector, evaluate_detection
from .detection_augment import View, augmented_views, detect_augmented
from .detection_data import CocoDetection
from .detection_export import ExportedDetector, export_detection
from .heads import FCNHead, FPNNeck, UPerHead
from .metrics import coco_map, confusion_matrix, segmentation_scores
from .predict import evaluate_dense, predict_dense
from .segmentation import (
    AUG_TEST_RATIOS,
    Segmentor,
    build_segmentor,
    create_segmentor,
    infer,
    infer_augmented,
    segmentation_loss,
)
from .segmentation_data import SegmentationFolder
from .train import DenseResult, fit_dense
from .weights import DenseSpec, load_dense, load_dense_weights, save_dense, save_mmdet, save_mmseg

__all__ = [
    "AUG_TEST_RATIOS",
    "CocoDetection",
    "DenseResult",
    "DenseSpec",
    "DetectionConfig",
    "ExportedDetector",
    "FCNHead",
    "FPNNeck",
    "SegmentationConfig",
    "SegmentationFolder",
    "Segmentor",
    "SwinBackbone",
    "SwinFPN",
    "UPerHead",
    "View",
    "augmented_views",
    "build_detector",
    "build_segmentor",
    "coco_map",
    "confusion_matrix",
    "create_backbone",
    "create_detector",
    "create_segmentor",
    "detect_augmented",
    "evaluate_dense",
    "evaluate_detection",
    "export_detection",
    "fit_dense",
    "infer",
    "infer_augmented",
    "load_dense",
    "load_dense_weights",
    "predict_dense",
    "resolve_dense_config",
    "save_dense",
    "save_mmdet",
    "save_mmseg",
    "segmentation_loss",
    "segmentation_scores",
]
