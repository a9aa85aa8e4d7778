"""Clip evaluation: video accuracy, det-acc@0.5, mean matched IoU, COCO-style AP, the confusion matrix with
per-class precision / recall / F1, :func:`evaluate` (all of them), the checkpoint-selection score and the text
report. Predictions are :mod:`postprocess`'s; a target is ``{"labels": int64 (N,), "boxes": (N, 4) normalised
xyxy}`` (``N`` may be 0; numpy arrays are accepted as well as tensors). no_object is the last row and column of the
confusion matrix; an undefined figure is NaN, the AP of a class without ground truth None.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from postprocess import NO_OBJECT, NO_OBJECT_NAME, _as_tensor, _pred, video_prediction

# COCO's IoU thresholds, built exactly as pycocotools does so that 0.55 etc. compare identically.
COCO_IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True))
# COCO's 101 recall points for interpolated precision.
_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _target(target: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels int64 (N,), boxes float32 (N, 4) xyxy) of a target dict; N may be 0."""
    labels = _as_tensor(target["labels"], torch.int64).reshape(-1)
    boxes = _as_tensor(target["boxes"], torch.float32).reshape(-1, 4)
    return labels, boxes


# --------------------------------------------------------------------------- video level


def _gt_classes(target: dict) -> list[int]:
    """Ground-truth classes of a video in label order, without duplicates; [] = no_object."""
    labels, _ = _target(target)
    return list(dict.fromkeys(int(c) for c in labels.tolist()))


def _check_lengths(preds: Sequence, targets: Sequence) -> None:
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")


def _nan_mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def video_accuracy(preds: Sequence[dict], targets: Sequence[dict], threshold: float = 0.5) -> float:
    """Video-level accuracy (the published definition).

    The predicted class of a video is :func:`video_prediction` (top query's class, or no_object
    below ``threshold``). Its ground truth is no_object when it has no boxes, else the *set* of
    its classes. A video is correct when the prediction is in that set, or both are no_object.
    Returns the fraction of correct videos over all videos (NaN for an empty list).
    """
    _check_lengths(preds, targets)
    correct = []
    for pred, target in zip(preds, targets):
        label, _, _ = video_prediction(pred, threshold)
        gt = _gt_classes(target) or [NO_OBJECT]
        correct.append(float(label in gt))
    return _nan_mean(correct)


def _top_iou_with(box: torch.Tensor, gt_boxes: torch.Tensor) -> float:
    """Largest IoU between one xyxy box (4,) and ground-truth boxes (N, 4); 0 when N == 0."""
    if gt_boxes.shape[0] == 0:
        return 0.0
    return float(box_iou(box.reshape(1, 4), gt_boxes).max())


def detection_accuracy(preds: Sequence[dict], targets: Sequence[dict], iou: float = 0.5,
                       threshold: float = 0.5) -> float:
    """det-acc@IoU (the published report's definition).

    Computed over the videos WITH actions only (N > 0); no_object videos are ignored. Such a
    video counts as a hit when its decision from :func:`video_prediction` (top query; no_object
    below ``threshold`` is a miss) has a class that is one of the video's GT classes AND the top
    query's box has IoU ``>= iou`` with at least one GT box of THAT class. Returns hits /
    positive videos, NaN when there is no positive video.
    """
    _check_lengths(preds, targets)
    hits = []
    for pred, target in zip(preds, targets):
        gt_labels, gt_boxes = _target(target)
        if gt_labels.numel() == 0:
            continue
        label, _, box = video_prediction(pred, threshold)
        same_class = gt_boxes[gt_labels == label]
        hits.append(float(label != NO_OBJECT and _top_iou_with(box, same_class) >= iou))
    return _nan_mean(hits)


def mean_matched_iou(preds: Sequence[dict], targets: Sequence[dict]) -> float:
    """Mean IoU of the matched boxes.

    Over the videos WITH actions only: the IoU between the top query's box (highest score,
    whatever its class and whether or not it passes the threshold) and the GT box that overlaps
    it most (any class), averaged over those videos. NaN when there is no positive video.
    It measures localisation alone; classification is covered by the other figures.
    """
    _check_lengths(preds, targets)
    ious = []
    for pred, target in zip(preds, targets):
        _, gt_boxes = _target(target)
        if gt_boxes.shape[0] == 0:
            continue
        _, _, box = video_prediction(pred, threshold=0.0)
        ious.append(0.0 if box is None else _top_iou_with(box, gt_boxes))
    return _nan_mean(ious)


# --------------------------------------------------------------------------- average precision


def _match_image(det_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                 iou_thresholds: Sequence[float]) -> np.ndarray:
    """COCO greedy matching of one image and class.

    Args:
        det_boxes: (D, 4) xyxy, already sorted by decreasing score.
        gt_boxes: (G, 4) xyxy.
    Returns:
        bool (T, D): whether each detection is a true positive at each IoU threshold. Each
        detection, in score order, takes the unmatched GT with the highest IoU >= threshold
        (ties go to the later GT, as in pycocotools).
    """
    num_t, num_d, num_g = len(iou_thresholds), det_boxes.shape[0], gt_boxes.shape[0]
    tp = np.zeros((num_t, num_d), dtype=bool)
    if num_d == 0 or num_g == 0:
        return tp
    ious = box_iou(det_boxes, gt_boxes).double().numpy()
    for ti, t in enumerate(iou_thresholds):
        taken = np.zeros(num_g, dtype=bool)
        for d in range(num_d):
            # pycocotools caps the threshold just below 1 so IoU == 1 boxes still match at 1.0.
            cand = np.where(~taken & (ious[d] >= min(t, 1 - 1e-10)), ious[d], -1.0)
            best = num_g - 1 - int(np.argmax(cand[::-1]))  # last index among equal maxima
            if cand[best] >= 0:
                taken[best] = True
                tp[ti, d] = True
    return tp


def _interpolated_ap(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> np.ndarray:
    """COCO 101-point interpolated AP for each IoU threshold.

    Args:
        tp: bool (T, D) true-positive flags of all detections of one class (all images).
        scores: (D,) their scores.
        num_gt: number of GT boxes of that class (> 0).
    Returns:
        float (T,) AP per threshold.
    """
    order = np.argsort(-scores, kind="mergesort")  # stable, as pycocotools
    tp = tp[:, order]
    tp_sum = np.cumsum(tp, axis=1, dtype=np.float64)
    fp_sum = np.cumsum(~tp, axis=1, dtype=np.float64)
    aps = np.zeros(tp.shape[0])
    for ti in range(tp.shape[0]):
        if tp.shape[1] == 0:
            continue  # GT but no detection: AP 0
        recall = tp_sum[ti] / num_gt
        precision = tp_sum[ti] / (tp_sum[ti] + fp_sum[ti] + np.spacing(1))
        # Precision envelope: best precision at any recall >= r.
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
        valid = idx < len(precision)
        aps[ti] = np.where(valid, precision[np.minimum(idx, len(precision) - 1)], 0.0).mean()
    return aps


def average_precision(preds: Sequence[dict], targets: Sequence[dict], num_classes: int,
                      iou_thresholds: Iterable[float] = COCO_IOU_THRESHOLDS,
                      max_dets: int = 100) -> dict:
    """COCO-style AP per class, every query a detection (DETR style: no NMS, no threshold).

    Each video is an image; each query is a detection of class ``labels[q]`` with score
    ``scores[q]`` (only the ``max_dets`` best per video and class, as COCO; Q=12 keeps them all).
    Matching and 101-point interpolation follow pycocotools with area range "all".

    Args:
        preds, targets: per-video dicts (boxes normalised xyxy).
        num_classes: ``C``, foreground classes.
        iou_thresholds: e.g. ``(0.5,)`` or :data:`COCO_IOU_THRESHOLDS`.

    Returns:
        ``{"per_class": list of C (float | None), "map": float, "per_threshold": (T,) list of
        per-class lists}``; ``per_class[c]`` averages over thresholds, ``None`` for classes
        without GT, which are also left out of ``map`` (``map`` is NaN if no class has GT).
    """
    _check_lengths(preds, targets)
    thresholds = [float(t) for t in iou_thresholds]
    per_class: list[float | None] = []
    per_threshold: list[list[float | None]] = [[] for _ in thresholds]
    data = [(_pred(p), _target(t)) for p, t in zip(preds, targets)]
    for c in range(num_classes):
        ap = _class_ap(data, c, thresholds, max_dets)
        per_class.append(None if ap is None else float(ap.mean()))
        for ti in range(len(thresholds)):
            per_threshold[ti].append(None if ap is None else float(ap[ti]))
    known = [a for a in per_class if a is not None]
    return {"per_class": per_class, "map": _nan_mean(known), "per_threshold": per_threshold}


def _class_ap(data: list, c: int, thresholds: list[float], max_dets: int) -> np.ndarray | None:
    """AP (T,) of class ``c`` over all videos, or None when the class has no GT box."""
    tps, scores, num_gt = [], [], 0
    for (p_scores, p_labels, p_boxes), (g_labels, g_boxes) in data:
        gt = g_boxes[g_labels == c]
        num_gt += gt.shape[0]
        keep = p_labels == c
        s, b = p_scores[keep], p_boxes[keep]
        order = torch.from_numpy(np.argsort(-s.numpy(), kind="mergesort")[:max_dets])
        s, b = s[order], b[order]
        tps.append(_match_image(b, gt, thresholds))
        scores.append(s.numpy().astype(np.float64))
    if num_gt == 0:
        return None
    return _interpolated_ap(np.concatenate(tps, axis=1), np.concatenate(scores), num_gt)


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix(preds: Sequence[dict], targets: Sequence[dict], num_classes: int,
                     threshold: float = 0.5) -> np.ndarray:
    """Confusion matrix of video-level decisions.

    Returns int64 ``(C+1, C+1)``: rows = ground truth, columns = prediction, index ``C`` =
    no_object. The prediction is :func:`video_prediction`. A video with several GT classes
    counts in the row of the class the prediction matches if any, else its first GT class
    (label order), so a correct video is always on the diagonal.
    """
    _check_lengths(preds, targets)
    cm = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, target in zip(preds, targets):
        label, _, _ = video_prediction(pred, threshold)
        gt = _gt_classes(target)
        col = num_classes if label == NO_OBJECT else label
        if not gt:
            row = num_classes
        else:
            row = label if label in gt else gt[0]
        cm[row, col] += 1
    return cm


def per_class_report(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Precision / recall / F1 / support per class from a confusion matrix (rows = GT).

    Args:
        cm: ``(K, K)`` counts; ``class_names`` has ``K`` names (include ``no_object``).
    Returns:
        ``{name: {"precision", "recall", "f1", "support"}}``; a ratio with a zero denominator is
        0.0 (as scikit-learn's default), support is an int.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    col, row = cm.sum(0), cm.sum(1)
    report = {}
    for k, name in enumerate(class_names):
        p = tp[k] / col[k] if col[k] else 0.0
        r = tp[k] / row[k] if row[k] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        report[name] = {"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(row[k])}
    return report


def _full_names(class_names: Sequence[str], size: int) -> list[str]:
    """Class names for a (size x size) matrix: foreground names plus no_object if missing."""
    names = list(class_names)
    if len(names) == size - 1:
        names.append(NO_OBJECT_NAME)
    if len(names) != size:
        raise ValueError(f"{len(class_names)} class names for a {size}x{size} confusion matrix")
    return names


# --------------------------------------------------------------------------- summary


def evaluate(preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
             threshold: float = 0.5) -> dict:
    """All figures for a set of videos.

    Args:
        preds: per-video predictions (:func:`outputs_to_predictions`).
        targets: per-video targets, boxes normalised xyxy.
        class_names: the ``C`` foreground class names (index = class id).
        threshold: score threshold for video-level decisions (not used by AP).

    Returns:
        dict with ``video_acc``, ``det_acc_50``, ``mean_iou``, ``ap50`` ({name: AP or None}),
        ``ap50_95`` ({name: AP or None}), ``map50``, ``map50_95``, ``confusion_matrix``
        (list of lists, rows = GT, last = no_object), ``per_class`` ({name incl. no_object:
        {precision, recall, f1, support}}), ``num_videos``, ``num_positive``, ``threshold``.
        Every value is a plain Python number/None/list/dict (JSON- and checkpoint-safe).
    """
    _check_lengths(preds, targets)
    num_classes = len(class_names)
    ap50 = average_precision(preds, targets, num_classes, iou_thresholds=(0.5,))
    ap_coco = average_precision(preds, targets, num_classes, iou_thresholds=COCO_IOU_THRESHOLDS)
    cm = confusion_matrix(preds, targets, num_classes, threshold)
    return {
        "video_acc": video_accuracy(preds, targets, threshold),
        "det_acc_50": detection_accuracy(preds, targets, 0.5, threshold),
        "mean_iou": mean_matched_iou(preds, targets),
        "ap50": dict(zip(class_names, ap50["per_class"])),
        "ap50_95": dict(zip(class_names, ap_coco["per_class"])),
        "map50": ap50["map"],
        "map50_95": ap_coco["map"],
        "confusion_matrix": cm.tolist(),
        "per_class": per_class_report(cm, _full_names(class_names, num_classes + 1)),
        "num_videos": len(preds),
        "num_positive": sum(1 for t in targets if _target(t)[0].numel() > 0),
        "threshold": float(threshold),
    }


def best_score(metrics: dict) -> float:
    """Checkpoint-selection criterion of the published code: ``video_acc + 0.2 * det_acc_50``, plus
    ``frame_map50 + video_map50`` where they are measured (per-frame labels: where and when matter there).

    An undefined (NaN/None) term counts as 0 so that a validation set without positives still
    ranks checkpoints instead of making every comparison False.
    """
    def term(key):
        value = metrics.get(key)
        return 0.0 if value is None or math.isnan(value) else float(value)

    return term("video_acc") + 0.2 * term("det_acc_50") + term("frame_map50") + term("video_map50")


def _fmt(value) -> str:
    """A figure as text: 4 decimals, ``n/a`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def format_report(result: dict, class_names: Sequence[str]) -> str:
    """Readable multi-line report of an :func:`evaluate` result. With frame-mAP (per-frame labels) it shows the tube
    figures and per-class frame-AP@0.5 / video-AP@0.5 (``frame_ap50`` / ``video_ap50``, by class name) instead of the
    whole-video box figures; the JSON keeps both."""
    lines = [
        f"videos: {result['num_videos']} ({result.get('num_positive', '?')} with actions), "
        f"threshold {result.get('threshold', 0.5):g}",
        f"video accuracy : {_fmt(result['video_acc'])}",
    ]
    tubes = "frame_map50" in result   # per-frame labels (VOC all-point AP, as YOWOv2)
    if tubes:   # the whole-video box figures would compare one box with the union of a tube's: meaningless here
        lines += [f"frame-mAP@0.5  : {_fmt(result['frame_map50'])}",
                  f"video-mAP@0.2  : {_fmt(result['video_map20'])}",
                  f"video-mAP@0.5  : {_fmt(result['video_map50'])}"]
        columns, first, second = ("fAP50", "vAP50"), result.get("frame_ap50", {}), result.get("video_ap50", {})
    else:
        lines += [f"det-acc@0.5    : {_fmt(result['det_acc_50'])}",
                  f"mean IoU       : {_fmt(result['mean_iou'])}",
                  f"mAP@0.5        : {_fmt(result['map50'])}",
                  f"mAP@[.5:.95]   : {_fmt(result['map50_95'])}"]
        columns, first, second = ("AP50", "AP"), result["ap50"], result.get("ap50_95", {})
    lines.append("")
    names = _full_names(class_names, len(result["confusion_matrix"]))
    width = max(10, *(len(n) for n in names)) + 1
    lines.append(f"{'class':<{width}} {columns[0]:>7} {columns[1]:>7} {'prec':>7} {'recall':>7} {'F1':>7} "
                 f"{'support':>8}")
    for name in names:
        pc = result["per_class"][name]
        lines.append(
            f"{name:<{width}} {_fmt(first.get(name)):>7} {_fmt(second.get(name)):>7} "
            f"{pc['precision']:>7.4f} {pc['recall']:>7.4f} {pc['f1']:>7.4f} {pc['support']:>8d}"
        )
    lines += ["", "confusion matrix (rows = ground truth, columns = predicted):"]
    cell = max(7, *(len(n) for n in names)) + 1
    lines.append(" " * width + "".join(f"{n:>{cell}}" for n in names))
    for name, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in row))
    return "\n".join(lines)
