"""Evaluation metrics for STAR (video-level accuracy, detection accuracy, AP, confusion matrix;
frame-mAP and video-mAP of tubes, in the last section).

Conventions used throughout this module
---------------------------------------
* ``C`` foreground classes, contiguous ids ``0 .. C-1``; ``no_object`` is id ``-1`` in
  predictions/decisions and index ``C`` (last row/column) in the confusion matrix.
* A *prediction* for one video (see :func:`outputs_to_predictions`) is a dict of CPU tensors::

      {"scores": float32 (Q,), "labels": int64 (Q,), "boxes": float32 (Q, 4) normalised xyxy}

  ``scores[q]`` is the best foreground softmax probability of query ``q`` and ``labels[q]`` its
  class.
* A *target* for one video is ``{"labels": int64 (N,), "boxes": float (N, 4) normalised xyxy}``;
  ``N`` may be 0 (a video without action). Numpy arrays are accepted as well as tensors.
* Scalar figures that are undefined (e.g. det-acc on a set without positive videos) are
  ``float("nan")``; per-class APs of classes without ground truth are ``None``.

Only numpy / torch / torchvision / matplotlib are used, never the model, so the module can be
imported by any tool.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

NO_OBJECT = -1
NO_OBJECT_NAME = "no_object"
# COCO's IoU thresholds, built exactly as pycocotools does so that 0.55 etc. compare identically.
COCO_IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True))
# COCO's 101 recall points for interpolated precision.
_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


# --------------------------------------------------------------------------- conversion


def outputs_to_predictions(outputs: dict) -> list[dict]:
    """Turn raw model outputs into per-video predictions.

    Args:
        outputs: ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4) cxcywh normalised}``;
            the last logit is ``no_object``. Other keys (``aux_outputs``) are ignored. Tube-mode outputs
            (``(B, Q, K, C+1)`` logits) go to :func:`tube_outputs_to_predictions`.

    Returns:
        ``B`` dicts ``{"scores": float32 (Q,), "labels": int64 (Q,), "boxes": float32 (Q, 4)}``
        on the CPU; boxes are normalised xyxy clamped to [0, 1]. The softmax runs over all
        ``C+1`` logits (so a confident ``no_object`` lowers every foreground score), then the
        no_object column is dropped: score = max foreground probability, label = its argmax.
    """
    logits = outputs["pred_logits"].detach().float().cpu()
    boxes = outputs["pred_boxes"].detach().float().cpu()
    if logits.dim() == 4:
        return tube_outputs_to_predictions(logits, boxes)
    probs = logits.softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    xyxy = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)
    return [
        {"scores": scores[b].contiguous(), "labels": labels[b].long().contiguous(), "boxes": xyxy[b].contiguous()}
        for b in range(logits.shape[0])
    ]


def tube_outputs_to_predictions(logits: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
    """Tube-mode outputs ``(B, Q, K, C+1)`` logits and ``(B, Q, K, 4)`` cxcywh boxes as per-clip predictions.

    How a tube is read: its class is the foreground class with the highest probability summed over the K
    steps (softmax over C+1 at each step); ``step_scores (Q, K)`` is that class's probability at each step (the
    actor acts there when it passes the score threshold); ``step_boxes (Q, K, 4)`` normalised xyxy. Why one class
    per tube: the tube is one actor doing one thing, and summing over steps lets the steps where it clearly acts
    outvote the uncertain ones. The clip view that the clip-mode metrics read: ``scores (Q,)`` the best step score
    (a query is a detection when it acts at one step at least), ``labels (Q,)``, ``boxes (Q, 4)`` its box at that
    step. ``step_probs (Q, K, C)``: every class's probability (tubes.join_tubes reads a joined tube's class from
    them); ``step_acting (Q, K)`` their sum, the probability that the actor acts at each step (the tube's extent)."""
    probs = logits.softmax(-1)[..., :-1]                                   # (B, Q, K, C)
    labels = probs.sum(2).argmax(-1)                                       # (B, Q)
    xyxy = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)                  # (B, Q, K, 4)
    return [tube_prediction(probs[b], labels[b], xyxy[b]) for b in range(logits.shape[0])]


def tube_prediction(step_probs: torch.Tensor, labels: torch.Tensor, step_boxes: torch.Tensor) -> dict:
    """One clip's tube-mode prediction (the keys of :func:`tube_outputs_to_predictions`) from every class's
    probability ``step_probs (Q, K, C)``, each query's class ``labels (Q,)`` and normalised xyxy ``step_boxes
    (Q, K, 4)``: ``step_scores`` is the class's probability at each step, ``step_acting`` the sum of all classes'
    (the actor acts, whatever it does), the clip view its best step."""
    labels = labels.long()
    step_scores = step_probs.gather(-1, labels[:, None, None].expand(*step_probs.shape[:2], 1)).squeeze(-1)   # (Q, K)
    scores, best_step = step_scores.max(-1)
    best_boxes = step_boxes[torch.arange(len(labels)), best_step]                                   # (Q, 4)
    return {"scores": scores.contiguous(), "labels": labels.contiguous(), "boxes": best_boxes.contiguous(),
            "step_scores": step_scores.contiguous(), "step_boxes": step_boxes.contiguous(),
            "step_probs": step_probs.contiguous(), "step_acting": step_probs.sum(-1).contiguous()}


def _as_tensor(x, dtype) -> torch.Tensor:
    """Tensor of ``dtype`` on the CPU from a tensor, numpy array or list."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _pred(pred: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores float32 (Q,), labels int64 (Q,), boxes float32 (Q, 4)) of a prediction dict."""
    scores = _as_tensor(pred["scores"], torch.float32).reshape(-1)
    labels = _as_tensor(pred["labels"], torch.int64).reshape(-1)
    boxes = _as_tensor(pred["boxes"], torch.float32).reshape(-1, 4)
    return scores, labels, boxes


def _target(target: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels int64 (N,), boxes float32 (N, 4) xyxy) of a target dict; N may be 0."""
    labels = _as_tensor(target["labels"], torch.int64).reshape(-1)
    boxes = _as_tensor(target["boxes"], torch.float32).reshape(-1, 4)
    return labels, boxes


# --------------------------------------------------------------------------- video level


def video_prediction(pred: dict, threshold: float = 0.5) -> tuple[int, float, torch.Tensor | None]:
    """The video's decision: its top-scoring query.

    Args:
        pred: one prediction dict (see module docstring).
        threshold: minimum score for a foreground decision.

    Returns:
        ``(label, score, box)``: ``label`` is the top query's class, or ``-1`` (no_object) when
        ``score < threshold``; ``score`` is the top query's score either way; ``box`` is the top
        query's normalised xyxy box ``(4,)`` either way (callers ignore it for no_object), or
        ``None`` when the prediction has no queries.
    """
    scores, labels, boxes = _pred(pred)
    if scores.numel() == 0:
        return NO_OBJECT, 0.0, None
    top = int(scores.argmax())
    score = float(scores[top])
    label = int(labels[top]) if score >= threshold else NO_OBJECT
    return label, score, boxes[top]


def detections(pred: dict, threshold: float) -> list[tuple[int, float, list[float]]]:
    """The published detection rule: every query whose score (best foreground probability) is at
    least ``threshold``, as ``(label, score, [x1, y1, x2, y2] normalised)``, best first."""
    scores, labels, boxes = _pred(pred)
    keep = (scores >= threshold).nonzero().flatten().tolist()
    keep.sort(key=lambda q: -float(scores[q]))
    return [(int(labels[q]), float(scores[q]), [float(v) for v in boxes[q]]) for q in keep]


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


def plot_training_history(results_csv, output_dir) -> None:
    """losses.png and metrics.png in ``output_dir`` from main.py's training_results.csv."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # as plot_confusion_matrix: no pyplot state
    from matplotlib.figure import Figure
    import pandas as pd

    table = pd.read_csv(results_csv)
    for name, columns in (("losses", ["train_loss", "val_loss"]),
                          ("metrics", ["video_acc", "det_acc_50", "mean_iou", "map50", "map50_95"])):
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for column in columns:
            rows = table[["epoch", column]].dropna()
            if len(rows):
                ax.plot(rows["epoch"], rows[column], marker="o", label=column)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(pathlib.Path(output_dir) / f"{name}.png", dpi=100)


def plot_confusion_matrix(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> None:
    """Save the confusion matrix (rows = GT, columns = prediction) as a PNG at ``path``.

    ``class_names`` may be the ``C`` foreground names (no_object is appended) or all ``C+1``.
    """
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no GUI, thread safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    names = _full_names(class_names, cm.shape[0])
    size = max(4.0, 0.8 * len(names) + 2.0)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Colour by row share so rare classes stay readable; the cells show raw counts.
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)


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


# --------------------------------------------------------------------------- tubes: frame-mAP and video-mAP
#
# The ACT / YOWOv2 protocols on UCF101-24 and JHMDB (DESIGN.md "Metrics"). Everything here works in
# PIXEL xyxy boxes with the +1 convention of those evaluators: a box (x1, y1, x2, y2) covers the pixels
# x1..x2 inclusive, so its area is (x2 - x1 + 1) * (y2 - y1 + 1). Frames are 0-based ints.
#
# Classes: ``num_classes`` contiguous ids 0..C-1. The AP of a class WITHOUT ground truth is NaN and is
# left out of the mean; a class WITH ground truth that is never predicted (or never matched) has AP 0
# and counts in the mean, as in the evaluators the papers use. ``map`` is NaN when no class has GT.
#
# AP: ``ap_mode="voc"`` is VOC all-point interpolation (precision envelope, area under the step curve;
# YOWOv2's ``voc_ap``, the figures YOWO/YOWOv2 report); ``ap_mode="trapezoid"`` is ACT's and MOC's
# ``pr_to_ap`` (no envelope, trapezoids from (recall 0, precision 1)), a few points lower.

AP_MODES = ("voc", "trapezoid")


@dataclasses.dataclass(eq=False)  # equal only to itself: numpy fields make == ambiguous
class Tube:
    """One actor doing one action over time.

    Attributes:
        video: the video's name (any string that is equal for the same video).
        class_id: contiguous class id in ``0..C-1``.
        score: the tube's score (ranks predictions; conventionally the mean of ``scores``).
        frames: int ``(n,)`` 0-based frame indices, sorted ascending, no repeats.
        boxes: float ``(n, 4)`` pixel xyxy, row i at ``frames[i]``.
        scores: optional float ``(n,)`` per-frame scores.
    """
    video: str
    class_id: int
    score: float
    frames: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray | None = None

    def __post_init__(self):
        self.frames = np.asarray(self.frames, dtype=np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if len(self.frames) == 0 or len(self.frames) != len(self.boxes):
            raise ValueError(f"tube of {self.video!r}: {len(self.frames)} frames for {len(self.boxes)} boxes "
                             "(a tube needs at least one frame, one box per frame)")
        if np.any(np.diff(self.frames) <= 0):
            raise ValueError(f"tube of {self.video!r}: frames must be sorted without repeats")


def _iou_plus1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of pixel xyxy boxes with the +1 convention; ``a (..., 4)`` and ``b (..., 4)`` broadcast:
    ``_iou_plus1(a[:, None], b[None])`` is the (N, M) matrix, ``_iou_plus1(a, b)`` pairs rows."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """bool (D,): detections (rows of ``iou (D, G)``, best score first) taking in turn the ground truth
    with the highest IoU among those not yet taken; a hit when that IoU >= ``threshold``."""
    num_d, num_g = iou.shape
    tp = np.zeros(num_d, dtype=bool)
    taken = np.zeros(num_g, dtype=bool)
    for d in range(num_d):
        if taken.all():
            break
        cand = np.where(taken, -1.0, iou[d])
        g = int(np.argmax(cand))
        if cand[g] >= threshold:
            tp[d], taken[g] = True, True
    return tp


def _voc_ap(tp: np.ndarray, num_gt: int, ap_mode: str = "voc") -> float:
    """AP of one class from true-positive flags ``tp (D,)`` ranked by decreasing score.

    ``voc``: all-point interpolation (precision made non-increasing, summed over recall steps).
    ``trapezoid``: ACT's curve from (recall 0, precision 1) through every detection, no envelope.
    NaN when ``num_gt == 0``; 0 when there is no detection."""
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
    if num_gt == 0:
        return float("nan")
    tp = np.asarray(tp, dtype=bool)
    if tp.size == 0:
        return 0.0
    tp_sum = np.cumsum(tp, dtype=np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / np.arange(1, tp.size + 1, dtype=np.float64)
    if ap_mode == "trapezoid":
        r = np.concatenate(([0.0], recall))
        p = np.concatenate(([1.0], precision))
        return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at any higher recall
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _rank_and_ap(parts: list, num_gt: int, ap_mode: str) -> float:
    """AP from ``[(scores (k,), input order (k,), tp (k,)), ...]`` pooled over videos/frames: ranked by
    decreasing score, ties in input order (a stable sort, as the reference evaluators)."""
    if not parts:
        return _voc_ap(np.zeros(0, dtype=bool), num_gt, ap_mode)
    scores = np.concatenate([p[0] for p in parts])
    order = np.concatenate([p[1] for p in parts])
    tp = np.concatenate([p[2] for p in parts])
    rank = np.lexsort((order, -scores))
    return _voc_ap(tp[rank], num_gt, ap_mode)


def _summary(aps: list[float], num_gt: list[int]) -> dict:
    known = [a for a in aps if not math.isnan(a)]
    return {"ap": aps, "map": _nan_mean(known), "num_gt": num_gt}


def _check_class(c: int, num_classes: int, what: str) -> int:
    c = int(c)
    if not 0 <= c < num_classes:
        raise ValueError(f"{what}: class id {c} outside 0..{num_classes - 1}")
    return c


def frame_map(detections: Iterable[Sequence], ground_truth: Iterable[Sequence], num_classes: int,
              iou_threshold: float = 0.5, ap_mode: str = "voc") -> dict:
    """frame-mAP (the ACT / YOWOv2 protocol): every frame is an image.

    Args:
        detections: rows ``(video, frame, class_id, score, x1, y1, x2, y2)``, pixel xyxy.
        ground_truth: rows ``(video, frame, class_id, x1, y1, x2, y2)``, pixel xyxy.
        num_classes: ``C``.
        iou_threshold: 0.5 in the papers.
        ap_mode: ``"voc"`` (all-point) or ``"trapezoid"`` (ACT).

    Per class, all detections of all frames are ranked by score; in that order each takes the
    not-yet-matched ground-truth box of its class in its frame with the highest IoU (+1 convention),
    a true positive when that IoU >= ``iou_threshold`` (ACT removes matched boxes the same way;
    YOWOv2's VOC code instead compares with the best box overall and counts a taken one as a false
    positive, which differs only when a frame has two boxes of one class overlapping the detection).

    Returns:
        ``{"ap": C floats (NaN for a class without GT), "map": mean over classes with GT,
        "num_gt": C ints}``.
    """
    gt_boxes: dict[tuple, list] = defaultdict(list)
    num_gt = [0] * num_classes
    for video, frame, c, *box in ground_truth:
        c = _check_class(c, num_classes, "ground truth")
        gt_boxes[(video, int(frame), c)].append(box)
        num_gt[c] += 1
    groups: dict[tuple, list] = defaultdict(list)
    for i, (video, frame, c, score, *box) in enumerate(detections):
        c = _check_class(c, num_classes, "detection")
        groups[(video, int(frame), c)].append((float(score), i, box))
    parts: list[list] = [[] for _ in range(num_classes)]
    for key, items in groups.items():
        items.sort(key=lambda it: (-it[0], it[1]))
        scores = np.array([it[0] for it in items])
        order = np.array([it[1] for it in items])
        gt = gt_boxes.get(key)
        if gt is None:
            tp = np.zeros(len(items), dtype=bool)
        else:
            boxes = np.array([it[2] for it in items], dtype=np.float64)
            tp = _greedy_match(_iou_plus1(boxes[:, None], np.array(gt, dtype=np.float64)[None]), iou_threshold)
        parts[key[2]].append((scores, order, tp))
    aps = [_rank_and_ap(parts[c], num_gt[c], ap_mode) for c in range(num_classes)]
    return _summary(aps, num_gt)


def fill_tube(tube: Tube) -> Tube:
    """The tube made gap-free from its first to its last frame: a missing frame takes the box (and
    per-frame score) of the nearest annotated frame, the earlier one on a tie (YOWOv2's linking)."""
    full = np.arange(tube.frames[0], tube.frames[-1] + 1)
    if len(full) == len(tube.frames):
        return tube
    right = np.clip(np.searchsorted(tube.frames, full), 0, len(tube.frames) - 1)
    left = np.clip(right - 1, 0, None)
    nearest = np.where(np.abs(full - tube.frames[left]) <= np.abs(tube.frames[right] - full), left, right)
    scores = None if tube.scores is None else tube.scores[nearest]
    return dataclasses.replace(tube, frames=full, boxes=tube.boxes[nearest], scores=scores)


def spatio_temporal_iou(a: Tube, b: Tube) -> float:
    """Spatio-temporal IoU of two tubes (ACT's ``iou3dt``): temporal IoU of the frame spans
    ``[first, last]`` (inclusive, in frames) times the mean box IoU (+1 convention) over the frames
    both tubes have. 0 when the spans do not meet. Tubes are expected gap-free (:func:`fill_tube`);
    ACT returns 0 when the spans share a single frame, here that frame counts."""
    start, end = max(a.frames[0], b.frames[0]), min(a.frames[-1], b.frames[-1])
    if end < start:
        return 0.0
    temporal = (end - start + 1) / (max(a.frames[-1], b.frames[-1]) - min(a.frames[0], b.frames[0]) + 1)
    shared, ia, ib = np.intersect1d(a.frames, b.frames, assume_unique=True, return_indices=True)
    if shared.size == 0:
        return 0.0
    return float(temporal * _iou_plus1(a.boxes[ia], b.boxes[ib]).mean())


def nms_tubes(tubes: Sequence[Tube], threshold: float = 0.3) -> list[Tube]:
    """Tube NMS (ACT's ``nms3dt``) within each (video, class): best score first, a tube is dropped
    when its spatio-temporal IoU with a kept one exceeds ``threshold``. Returns the kept tubes in
    their input order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tubes):
        groups[(t.video, int(t.class_id))].append(i)
    keep: list[int] = []
    for idx in groups.values():
        kept: list[int] = []
        for i in sorted(idx, key=lambda i: (-float(tubes[i].score), i)):
            if all(spatio_temporal_iou(tubes[i], tubes[k]) <= threshold for k in kept):
                kept.append(i)
        keep.extend(kept)
    return [tubes[i] for i in sorted(keep)]


def video_map(pred_tubes: Sequence[Tube], gt_tubes: Sequence[Tube], num_classes: int,
              iou_threshold: float = 0.5, nms_threshold: float | None = 0.3, ap_mode: str = "voc") -> dict:
    """video-mAP (the ACT / YOWOv2 protocol) at spatio-temporal IoU ``iou_threshold`` (0.2, 0.5...).

    Predicted tubes are made gap-free (:func:`fill_tube`), suppressed per video and class at
    ``nms_threshold`` (None: no NMS), ranked per class by ``score``; in that order each takes the
    not-yet-matched ground-truth tube of its video and class with the highest spatio-temporal IoU, a
    true positive when it is >= ``iou_threshold``. GT tubes are filled too (a no-op for gap-free
    ones, e.g. from :func:`tubes_from_tracks`).

    Returns:
        ``{"ap": C floats (NaN for a class without GT), "map": mean over classes with GT,
        "num_gt": C ints (GT tubes)}``.
    """
    preds = [fill_tube(t) for t in pred_tubes]
    if nms_threshold is not None:
        preds = nms_tubes(preds, nms_threshold)
    gt_by: dict[tuple, list[Tube]] = defaultdict(list)
    num_gt = [0] * num_classes
    for t in gt_tubes:
        c = _check_class(t.class_id, num_classes, "ground-truth tube")
        gt_by[(t.video, c)].append(fill_tube(t))
        num_gt[c] += 1
    groups: dict[tuple, list] = defaultdict(list)
    for i, t in enumerate(preds):
        groups[(t.video, _check_class(t.class_id, num_classes, "predicted tube"))].append((float(t.score), i, t))
    parts: list[list] = [[] for _ in range(num_classes)]
    for key, items in groups.items():
        items.sort(key=lambda it: (-it[0], it[1]))
        gts = gt_by.get(key, [])
        iou = np.array([[spatio_temporal_iou(t, g) for g in gts] for _, _, t in items]).reshape(len(items), len(gts))
        tp = _greedy_match(iou, iou_threshold) if gts else np.zeros(len(items), dtype=bool)
        parts[key[1]].append((np.array([it[0] for it in items]), np.array([it[1] for it in items]), tp))
    aps = [_rank_and_ap(parts[c], num_gt[c], ap_mode) for c in range(num_classes)]
    return _summary(aps, num_gt)


def tubes_from_tracks(rows: Iterable[Sequence], max_gap: int | None = None) -> list[Tube]:
    """Ground-truth tubes from per-frame label lines.

    Args:
        rows: ``(video, frame, track_id, class_id, x1, y1, x2, y2)``: a label file's 7-field lines with
            the video's name in front; ``class_id`` already contiguous (``0..C-1``).
        max_gap: a track's lines of one class further apart than this many frames start a new tube
            (the actor stopped doing the action); None never splits. Frames missing inside a tube get
            the linear interpolation of the boxes around them (the dataset's rule).

    Returns:
        One :class:`Tube` (score 1) per video, track, class and unbroken run, ordered by those keys.
    """
    per: dict[tuple, dict[int, list]] = defaultdict(dict)
    for video, frame, track, c, *box in rows:
        per[(video, int(track), int(c))].setdefault(int(frame), [float(v) for v in box])
    tubes = []
    for (video, _, c), by_frame in sorted(per.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        frames = np.array(sorted(by_frame))
        boxes = np.array([by_frame[f] for f in frames])
        cuts = np.nonzero(np.diff(frames) > max_gap)[0] + 1 if max_gap is not None else []
        for f, b in zip(np.split(frames, cuts), np.split(boxes, cuts)):
            full = np.arange(f[0], f[-1] + 1)
            filled = np.stack([np.interp(full, f, b[:, k]) for k in range(4)], axis=1)
            tubes.append(Tube(video, c, 1.0, full, filled))
    return tubes


# ----------------------------------------------------------------------------- STAR's predictions as tubes

TUBE_FIELDS = ("frame_map50", "video_map20", "video_map50")


class TubeScorer:
    """Collects clips (or whole videos) of predictions and per-frame ground truth, then scores them with
    :func:`frame_map` and :func:`video_map`. Boxes come normalised xyxy and are scored in pixels.

    A clip-mode prediction is one box per query for its whole span: it stands at every frame of the span
    (a tube with a constant box), scored with the query's best foreground probability."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.detections, self.ground_truth, self.pred_tubes, self.gt_tubes = [], [], [], []

    def add_prediction(self, video: str, frames, class_id: int, score: float, box, width: int, height: int,
                       as_frames: bool = True, as_tube: bool = True) -> None:
        """One query (or joined detection) at ``frames`` (ints) with one normalised ``box``: as a detection in each
        frame (frame-mAP) and/or as one tube (video-mAP)."""
        frames = np.unique(np.asarray(frames, dtype=np.int64))
        if not len(frames):
            return
        boxes = np.repeat(np.asarray(box, dtype=np.float64).reshape(1, 4), len(frames), 0)
        if as_frames:
            self.add_frame_detections(video, class_id, frames, np.full(len(frames), float(score)), boxes, width, height)
        if as_tube:
            self.add_tube(video, class_id, score, frames, boxes, width, height)

    def add_frame_detections(self, video: str, class_id: int, frames, scores, boxes, width: int, height: int) -> None:
        """One query's detections at video ``frames`` (n,) with ``scores`` (n,) and normalised xyxy ``boxes`` (n, 4)
        (frame-mAP only)."""
        pixels = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [width, height, width, height]
        self.detections += [(video, int(f), int(class_id), float(s), *b)
                            for f, s, b in zip(np.asarray(frames).tolist(), np.asarray(scores).tolist(), pixels)]

    def add_tube(self, video: str, class_id: int, score: float, frames, boxes, width: int, height: int) -> None:
        """One predicted tube, a normalised xyxy box ``(n, 4)`` at each of its ``frames`` (video-mAP only)."""
        pixels = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [width, height, width, height]
        self.pred_tubes.append(Tube(video, int(class_id), float(score), frames, pixels))

    def add_clip_predictions(self, video: str, frames, pred: dict, width: int, height: int, as_tube: bool = True,
                             threshold: float = 0.5, as_frames: bool = True) -> None:
        """Every query of a clip-mode prediction ``{"scores", "labels", "boxes" (Q, 4)}`` at the clip's ``frames``.
        A tube-mode prediction (``step_scores (Q, K)``, ``step_acting (Q, K)``, ``step_boxes (Q, K, 4)``, K =
        len(frames)) gives a detection per query per step (``as_frames``), and a tube of the steps where it acts
        (``step_acting >= threshold``), scored by the mean of their step scores (``as_tube``)."""
        if "step_scores" not in pred:
            for score, label, box in zip(pred["scores"].tolist(), pred["labels"].tolist(), pred["boxes"].tolist()):
                self.add_prediction(video, frames, label, score, box, width, height, as_tube=as_tube)
            return
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        for label, scores, acting, boxes in zip(pred["labels"].tolist(), pred["step_scores"].numpy(),
                                                pred["step_acting"].numpy(), pred["step_boxes"].numpy()):
            if as_frames:
                self.add_frame_detections(video, label, frames, scores, boxes, width, height)
            on = acting >= threshold
            if as_tube and on.any():   # repeated frames (a short video) keep their first step
                kept, first = np.unique(frames[on], return_index=True)
                self.add_tube(video, label, float(scores[on].mean()), kept, boxes[on][first], width, height)

    def add_truth(self, video: str, class_id: int, frames, boxes, width: int, height: int,
                  split_gaps: bool = True) -> None:
        """One actor doing ``class_id`` at ``frames`` (n,) with normalised xyxy ``boxes`` (n, 4); with ``split_gaps``
        a gap in ``frames`` starts a new tube (without: one tube over sampled frames, e.g. a clip's)."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        pixels = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [width, height, width, height]
        self.ground_truth += [(video, int(f), int(class_id), *b) for f, b in zip(frames, pixels)]
        cuts = np.nonzero(np.diff(frames) > 1)[0] + 1 if split_gaps else []
        for f, b in zip(np.split(frames, cuts), np.split(pixels, cuts)):
            if len(f):
                self.gt_tubes.append(Tube(video, int(class_id), 1.0, f, b))

    def add_clip_truth(self, video: str, target: dict, width: int, height: int) -> None:
        """The per-step ground truth of a clip target (``track_labels`` (M, T), ``track_boxes`` (M, T, 4)
        cxcywh normalised, ``frame_indices`` (T,)) at the clip's sampled frames: one tube per row and class."""
        frames = np.asarray(target["frame_indices"]).reshape(-1)
        labels = np.asarray(target["track_labels"]).reshape(-1, len(frames))
        boxes = box_convert(torch.as_tensor(target["track_boxes"]).reshape(-1, 4), "cxcywh", "xyxy")
        boxes = boxes.numpy().reshape(len(labels), len(frames), 4)
        for row_labels, row_boxes in zip(labels, boxes):
            for c in np.unique(row_labels[row_labels >= 0]):
                on = row_labels == c
                self.add_truth(video, int(c), frames[on], row_boxes[on], width, height, split_gaps=False)

    def result(self, class_names: Sequence[str] | None = None) -> dict:
        """``frame_map50``, ``video_map20``, ``video_map50`` (VOC all-point AP, mean over classes with GT); given the
        C ``class_names``, also ``frame_ap50`` and ``video_ap50``: ``{name: AP}`` (None for a class without GT)."""
        if not self.ground_truth:
            return {}
        frame = frame_map(self.detections, self.ground_truth, self.num_classes, 0.5)
        video = {iou: video_map(self.pred_tubes, self.gt_tubes, self.num_classes, iou) for iou in (0.2, 0.5)}
        result = {"frame_map50": frame["map"], "video_map20": video[0.2]["map"], "video_map50": video[0.5]["map"]}
        if class_names is not None:
            result.update({key: {name: None if math.isnan(a) else a for name, a in zip(class_names, aps)}
                           for key, aps in (("frame_ap50", frame["ap"]), ("video_ap50", video[0.5]["ap"]))})
        return result
