"""The field's tube metrics: frame-mAP and video-mAP as the ACT / YOWOv2 evaluators compute them (:class:`Tube`,
:func:`frame_map`, :func:`video_map`, spatio-temporal IoU, tube NMS, ground-truth tubes from per-frame label
lines), and :class:`TubeScorer`, which scores STAR's clip- or tube-mode predictions with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert

from metrics import _nan_mean

# The ACT / YOWOv2 protocols on UCF101-24 and JHMDB. Everything here works in PIXEL xyxy boxes with the
# +1 convention of those evaluators: a box (x1, y1, x2, y2) covers the pixels x1..x2 inclusive, so its area is
# (x2 - x1 + 1) * (y2 - y1 + 1). Frames are 0-based ints.
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
