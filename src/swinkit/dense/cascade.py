"""Cascade R-CNN's box stages (Cai & Vasconcelos, CVPR 2018) on torchvision's detection engine.

The Swin paper's main COCO detector is Cascade Mask R-CNN, configured as in Swin's mmdet configs
(``cascade_mask_rcnn_swin_*_giou_4conv1f``): three box stages trained at IoU thresholds 0.5, 0.6
and 0.7, each a head of four 3x3 convolutions with BatchNorm and one fully connected layer
(torchvision's ``FastRCNNConvFCHead``), class scores plus a box per class
(``reg_class_agnostic=False``), the box loss GIoU on the decoded box of the truth's class
(weight 10), the stages' losses weighted 1, 0.5 and 0.25. Each stage refines the previous
stage's boxes (detached) with the box of each region's class: its truth's for a positive region,
the stage's highest-scoring object class otherwise (mmdet's ``refine_bboxes``). Stage t decodes
with mmdet's target stds for that stage (BoxCoder weights 10, 20, 30 for centres). With masks,
each stage has its own mask head, trained on its positives; at test time the stages' mask
probabilities are averaged.

At test time each stage but the last moves every region by the box of the class it scores
highest; the class logits of the three stages, each on the boxes its stage was given, are
averaged before the softmax, and the last stage's boxes per class are the detections (mmdet's
``CascadeRoIHead.simple_test``); then torchvision's per-class NMS and top-k. Files written
before swinkit followed ``reg_class_agnostic=False`` have one box for every class
(``agnostic_boxes``), and load as they were trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

CASCADE_IOUS = (0.5, 0.6, 0.7)
# BoxCoder weights are 1 / mmdet's target_stds: (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
# (0.033, 0.033, 0.067, 0.067); the later stages see better boxes, so smaller deltas.
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067))
CASCADE_STAGE_WEIGHTS = (1.0, 0.5, 0.25)
GIOU_LOSS_WEIGHT = 10.0
POSITIVE_FRACTION = 0.25


class BoxPredictor(nn.Module):
    """Class logits (``num_classes`` with the background first) and box deltas: one box per class in
    torchvision's layout (``4 * num_classes``, the background's unused), or with ``agnostic`` one
    box for every class.

    Initialised as mmdet's ``BBoxHead``: normal weights, std 0.01 for the scores, 0.001 for the box.
    """

    def __init__(self, in_features: int, num_classes: int, agnostic: bool = False) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 if agnostic else 4 * num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(nn.Module):
    """Three (or more) box stages, optionally each with a mask head; torchvision's ``RoIHeads`` interface.

    ``stages`` are torchvision ``RoIHeads`` (one per stage: its IoU threshold, box coder, box head,
    predictor, mask head), used for their matching, sampling and post-processing; this module runs
    the cascade between them. ``stage_weights`` scale each stage's losses.
    """

    def __init__(self, stages: Sequence[RoIHeads], stage_weights: Sequence[float] = CASCADE_STAGE_WEIGHTS) -> None:
        super().__init__()
        if len(stages) != len(stage_weights):
            raise ValueError(f"{len(stages)} cascade stages but {len(stage_weights)} stage weights")
        self.stages = nn.ModuleList(stages)
        self.stage_weights = tuple(stage_weights)

    @property
    def has_masks(self) -> bool:
        return self.stages[0].has_mask()

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("a cascade in training mode needs targets")
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    # -- training --------------------------------------------------------------------------------

    def _losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        losses: dict[str, Tensor] = {}
        rois = proposals
        for index, (stage, weight) in enumerate(zip(self.stages, self.stage_weights, strict=True)):
            sampled, matched, labels, is_gt = _sample(stage, rois, gt_boxes, gt_labels)
            logits, deltas = _box_forward(stage, features, sampled, image_shapes)
            classes = torch.cat(labels)
            # A positive region's box is its truth's class's; a background region's, the class it scores highest.
            classes = torch.where(classes > 0, classes, _best_object_class(logits.detach()))
            boxes = stage.box_coder.decode(_class_deltas(deltas, classes), sampled).reshape(-1, 4)
            truths = torch.cat(_matched_truths(gt_boxes, matched))
            classification, box = _box_losses(logits, boxes, torch.cat(labels), truths)
            losses[f"loss_classifier_{index}"] = weight * classification
            losses[f"loss_box_reg_{index}"] = weight * box
            if self.has_masks:
                losses[f"loss_mask_{index}"] = weight * _mask_loss(
                    stage, features, sampled, matched, labels, image_shapes, targets
                )
            if index + 1 < len(self.stages):  # the next stage starts from these boxes, less the added truths
                refined = boxes.detach().split([len(s) for s in sampled])
                rois = [
                    box_ops.clip_boxes_to_image(r[~gt], shape)
                    for r, gt, shape in zip(refined, is_gt, image_shapes, strict=True)
                ]
        return losses

    # -- inference -------------------------------------------------------------------------------

    def box_outputs(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The cascade's class logits (the stages' mean), the last stage's deltas (a box per class)
        and the regions the last stage saw, per image: what its post-processing decodes."""
        rois, all_logits = proposals, []
        for index, stage in enumerate(self.stages):
            logits, deltas = _box_forward(stage, features, rois, image_shapes)
            all_logits.append(logits)
            if index + 1 < len(self.stages):  # each region moved by the box of the class this stage scores highest
                chosen = _class_deltas(deltas, _best_object_class(logits))
                refined = stage.box_coder.decode(chosen, rois).reshape(-1, 4).split([r.shape[0] for r in rois])
                rois = [box_ops.clip_boxes_to_image(r, shape) for r, shape in zip(refined, image_shapes, strict=True)]
        logits = torch.stack(all_logits).mean(dim=0)
        if deltas.shape[1] == 4:  # one box for every class: torchvision's post-processing takes a box per class
            deltas = deltas.repeat(1, logits.shape[1])
        return logits, deltas, rois

    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        logits, deltas, rois = self.box_outputs(features, proposals, image_shapes)
        boxes, scores, labels = self.stages[-1].postprocess_detections(logits, deltas, rois, image_shapes)
        result = [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels, strict=True)]
        if self.has_masks:
            probabilities = [_mask_probabilities(stage, features, boxes, labels, image_shapes) for stage in self.stages]
            for i, detection in enumerate(result):
                detection["masks"] = torch.stack([p[i] for p in probabilities]).mean(dim=0)
        return result


def _sample(
    stage: RoIHeads, rois: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The stage's training regions: the truths added to ``rois``, matched at the stage's IoU, sampled.

    Returns the sampled boxes, their matched truth's index, their labels (0: background) and
    whether each is an added truth, per image.
    """
    with_truths = stage.add_gt_proposals(rois, gt_boxes)
    matched, labels = stage.assign_targets_to_proposals(with_truths, gt_boxes, gt_labels)
    chosen = stage.subsample(labels)
    sampled = [boxes[c] for boxes, c in zip(with_truths, chosen, strict=True)]
    is_gt = [c >= len(r) for c, r in zip(chosen, rois, strict=True)]
    matched = [m[c] for m, c in zip(matched, chosen, strict=True)]
    return sampled, matched, [lab[c] for lab, c in zip(labels, chosen, strict=True)], is_gt


def _matched_truths(gt_boxes: list[Tensor], matched: list[Tensor]) -> list[Tensor]:
    """Each sampled region's matched truth box, per image (zeros for an image without truths)."""
    return [gt[m] if len(gt) else gt.new_zeros(len(m), 4) for gt, m in zip(gt_boxes, matched, strict=True)]


def _best_object_class(logits: Tensor) -> Tensor:
    """The highest-scoring class of each region, the background left out (labels count from 1)."""
    return logits[:, 1:].argmax(dim=1) + 1


def _class_deltas(deltas: Tensor, classes: Tensor) -> Tensor:
    """Each region's box deltas ``(N, 4)`` for its class in ``classes`` (class-agnostic deltas as they are)."""
    if deltas.shape[1] == 4:
        return deltas
    count = deltas.shape[0]  # not len(): an exporter's tracer keeps a size it reads this way a variable
    # unflatten, not view(count, -1, 4): with no regions (a batch without objects) -1 is ambiguous.
    return deltas.unflatten(1, (-1, 4))[torch.arange(count, device=deltas.device), classes]


def _box_forward(
    stage: RoIHeads, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    return stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, image_shapes)))


def _mask_forward(
    stage: RoIHeads, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
) -> Tensor:
    return stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, boxes, image_shapes)))


def _box_losses(logits: Tensor, boxes: Tensor, labels: Tensor, truths: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sampled regions; GIoU of the positives' decoded boxes with their
    truths, times :data:`GIOU_LOSS_WEIGHT`, over the number of sampled regions (mmdet's average)."""
    classification = F.cross_entropy(logits, labels)
    positive = labels > 0
    giou = generalized_box_iou_loss(boxes[positive], truths[positive], reduction="sum")
    return classification, GIOU_LOSS_WEIGHT * giou / max(len(labels), 1)


def _mask_loss(
    stage: RoIHeads,
    features: dict[str, Tensor],
    sampled: list[Tensor],
    matched: list[Tensor],
    labels: list[Tensor],
    image_shapes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
) -> Tensor:
    positive = [torch.where(lab > 0)[0] for lab in labels]
    boxes = [s[p] for s, p in zip(sampled, positive, strict=True)]
    mask_logits = _mask_forward(stage, features, boxes, image_shapes)
    gt_masks, gt_labels = [t["masks"] for t in targets], [t["labels"] for t in targets]
    return maskrcnn_loss(
        mask_logits, boxes, gt_masks, gt_labels, [m[p] for m, p in zip(matched, positive, strict=True)]
    )


def _mask_probabilities(
    stage: RoIHeads,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> list[Tensor]:
    """The stage's mask probabilities ``(N, 1, 28, 28)`` of each detection's class, per image."""
    return list(maskrcnn_inference(_mask_forward(stage, features, boxes, image_shapes), labels))
