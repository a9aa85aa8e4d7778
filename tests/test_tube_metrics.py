"""Tests for tube_metrics.py (frame-mAP, video-mAP): hand-computed cases, and
frame-mAP against pycocotools' matching with each AP interpolation compared like with like.

Conventions checked here: pixel xyxy boxes with the +1 convention; VOC all-point AP by default,
ACT's trapezoid on request; a class with ground truth that is never predicted has AP 0 and counts
in the mean; a class without ground truth has AP NaN and is left out of the mean.
"""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

import tube_metrics
from tube_metrics import Tube

A = [0, 0, 99, 99]  # 100 x 100 pixels with the +1 convention


def det(video, frame, c, score, box):
    return (video, frame, c, score, *box)


def gt(video, frame, c, box):
    return (video, frame, c, *box)


# ---------------------------------------------------------------------------- building blocks


def test_iou_plus_one_convention():
    assert tube_metrics._iou_plus1(np.array(A), np.array(A)) == 1.0
    # [0, 49] and [50, 99] touch without sharing a pixel; [0, 50] shares one column of 100 pixels
    assert tube_metrics._iou_plus1(np.array([0, 0, 49, 99]), np.array([50, 0, 99, 99])) == 0.0
    assert tube_metrics._iou_plus1(np.array([0, 0, 50, 99]), np.array([50, 0, 99, 99])) == pytest.approx(100 / 10000)
    m = tube_metrics._iou_plus1(np.array([A, [0, 0, 49, 99]])[:, None], np.array([A])[None])
    assert m.shape == (2, 1) and m[:, 0].tolist() == [1.0, 0.5]


def test_voc_and_trapezoid_ap_by_hand():
    # ranks: TP, FP, TP with 2 GT -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    tp = np.array([True, False, True])
    assert tube_metrics._voc_ap(tp, 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # envelope: 2/3 from recall 1/2 on
    assert tube_metrics._voc_ap(tp, 2, "trapezoid") == pytest.approx(0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2)
    assert tube_metrics._voc_ap(np.zeros(0, bool), 3) == 0.0 and math.isnan(tube_metrics._voc_ap(tp, 0))
    with pytest.raises(ValueError):
        tube_metrics._voc_ap(tp, 2, "coco")


# ---------------------------------------------------------------------------- frame-mAP by hand


def test_frame_map_duplicates_and_missed_class():
    gts = [gt("v", 0, 0, A), gt("v", 1, 0, A), gt("v", 0, 1, A)]
    dets = [det("v", 0, 0, 0.9, A),                    # TP
            det("v", 0, 0, 0.8, [1, 1, 100, 100]),     # duplicate of a matched box: FP
            det("v", 1, 0, 0.7, [2, 0, 101, 99]),      # TP
            det("v", 5, 0, 0.6, A),                    # a frame without GT: FP
            det("v", 0, 2, 0.5, A)]                    # class 2 has no GT anywhere
    r = tube_metrics.frame_map(dets, gts, num_classes=4)
    ap0 = 0.5 * 1 + 0.5 * 2 / 3
    assert r["ap"][0] == pytest.approx(ap0)
    assert r["ap"][1] == 0.0                           # GT, never predicted: 0, counted in the mean
    assert math.isnan(r["ap"][2]) and math.isnan(r["ap"][3])  # no GT: NaN, left out
    assert r["map"] == pytest.approx((ap0 + 0.0) / 2) and r["num_gt"] == [2, 1, 0, 0]
    trap = tube_metrics.frame_map(dets, gts, 4, ap_mode="trapezoid")
    assert trap["ap"][0] == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2 + 0.0)  # the FP at recall 1 adds nothing
    assert trap["ap"][0] < r["ap"][0]


def test_frame_map_two_actors_in_one_frame():
    a, b = A, [50, 0, 149, 99]  # two actors of one class, IoU 1/3 with each other
    gts = [gt("v", 3, 0, a), gt("v", 3, 0, b)]
    # the second detection overlaps A most (0.667, taken) and B enough (70/130 = 0.538): it takes B
    dets = [det("v", 3, 0, 0.9, a), det("v", 3, 0, 0.8, [20, 0, 119, 99])]
    assert tube_metrics.frame_map(dets, gts, 1)["ap"] == [1.0]
    # at IoU 0.6 it misses B: precision 1/2 at recall 1/2
    assert tube_metrics.frame_map(dets, gts, 1, iou_threshold=0.6)["ap"] == [pytest.approx(0.5)]
    # boxes of another video or frame never match
    assert tube_metrics.frame_map([det("w", 3, 0, 0.9, a), det("v", 4, 0, 0.9, a)], gts, 1)["ap"] == [0.0]


def test_frame_map_checks_class_ids():
    with pytest.raises(ValueError, match="class id 3 outside 0..1"):
        tube_metrics.frame_map([det("v", 0, 3, 0.5, A)], [], 2)
    assert math.isnan(tube_metrics.frame_map([], [], 2)["map"])


# ---------------------------------------------------------------------------- frame-mAP against pycocotools


def _coco_eval(dets, gts, num_classes):
    """pycocotools' COCOeval at IoU 0.5, one image per (video, frame), boxes as xywh without the +1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted({(r[0], r[1]) for r in gts} | {(r[0], r[1]) for r in dets})
    ids = {k: i + 1 for i, k in enumerate(images)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = {"images": [{"id": i} for i in ids.values()],
                        "categories": [{"id": c + 1} for c in range(num_classes)],
                        "annotations": [{"id": n + 1, "image_id": ids[(r[0], r[1])], "category_id": r[2] + 1,
                                         "bbox": xywh(r[3:]), "area": (r[5] - r[3]) * (r[6] - r[4]), "iscrowd": 0}
                                        for n, r in enumerate(gts)]}
        coco.createIndex()
        found = coco.loadRes([{"image_id": ids[(r[0], r[1])], "category_id": r[2] + 1, "score": r[3],
                               "bbox": xywh(r[4:])} for r in dets])
        ev = COCOeval(coco, found, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
        ev.accumulate()
    return ev


def _brute_force_voc_ap(tp_by_score: list[bool], num_gt: int) -> float:
    """All-point AP straight from its definition: each true positive adds 1/num_gt of recall at the best
    precision reached at that rank or any later one."""
    n = len(tp_by_score)
    precision = [sum(tp_by_score[:k + 1]) / (k + 1) for k in range(n)]
    return sum(max(precision[k:]) / num_gt for k in range(n) if tp_by_score[k])


def _random_case(seed: int):
    """Frames of two videos, 3 classes, 1-3 actors a frame; detections: near copies (IoU > 0.6),
    shifted copies (IoU < 0.35) and strays, distinct scores: no decision sits near IoU 0.5 under
    either box convention, so pycocotools (no +1) and frame_map (+1) must match the same boxes."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for video in ("a", "b"):
        for frame in range(6):
            for k in range(rng.integers(1, 4)):  # actors 200 px apart: they never overlap each other
                c = int(rng.integers(0, 3))
                x, y = 200 * k + rng.uniform(0, 50), rng.uniform(0, 300)
                box = [x, y, x + rng.uniform(80, 120), y + rng.uniform(80, 120)]
                gts.append(gt(video, frame, c, box))
                kind = rng.choice(["near", "near", "shifted", "none"])
                if kind == "near":
                    dets.append(det(video, frame, c, 0, [v + rng.uniform(-4, 4) for v in box]))
                elif kind == "shifted":
                    dets.append(det(video, frame, c, 0, [box[0] + 70, box[1] + 10, box[2] + 70, box[3] + 10]))
            if rng.random() < 0.5:
                dets.append(det(video, frame, int(rng.integers(0, 3)), 0, [700, 600, 800, 700]))
    scores = rng.permutation(len(dets)) / len(dets) + 0.01
    dets = [(d[0], d[1], d[2], float(s), *d[4:]) for d, s in zip(dets, scores)]
    for d in dets:  # the premise of the comparison, checked
        for g in gts:
            if (g[0], g[1], g[2]) == (d[0], d[1], d[2]):
                a, b = np.array(d[4:]), np.array(g[3:])
                plain = tube_metrics._iou_plus1(a - [0, 0, 1, 1], b - [0, 0, 1, 1])  # x2 - 1 cancels the +1
                assert abs(plain - 0.5) > 0.1 and abs(tube_metrics._iou_plus1(a, b) - 0.5) > 0.1
    return dets, gts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frame_map_matches_pycocotools_matching_with_voc_interpolation(seed):
    """pycocotools decides TP/FP per detection (greedy, best unmatched GT: the same rule); its AP is
    101-point, so the VOC all-point AP is recomputed here from ITS decisions by brute force."""
    dets, gts = _random_case(seed)
    ev = _coco_eval(dets, gts, 3)
    ours = tube_metrics.frame_map(dets, gts, 3)
    for c in range(3):
        tp, score = [], []
        for e in ev.evalImgs:
            if e is not None and e["category_id"] == c + 1 and e["aRng"] == [0, 1e10]:
                tp += [bool(m) for m in e["dtMatches"][0]]
                score += list(e["dtScores"])
        ranked = [t for _, t in sorted(zip(score, tp), key=lambda p: -p[0])]
        num_gt = sum(1 for g in gts if g[2] == c)
        assert ours["num_gt"][c] == num_gt
        assert ours["ap"][c] == pytest.approx(_brute_force_voc_ap(ranked, num_gt), abs=1e-12)


def test_frame_map_equals_coco_101_point_where_the_interpolations_coincide():
    """When the precision envelope is flat over recall [0, 1] both interpolations give that precision:
    class 0 ranks FP, TP, TP with 2 GT (envelope 2/3 everywhere); class 1 is found perfectly."""
    gts = [gt("v", 0, 0, A), gt("v", 1, 0, A), gt("v", 0, 1, [10, 10, 60, 90])]
    dets = [det("v", 2, 0, 0.9, A), det("v", 0, 0, 0.8, A), det("v", 1, 0, 0.7, A),
            det("v", 0, 1, 0.6, [11, 10, 60, 91])]
    ours = tube_metrics.frame_map(dets, gts, 2)
    precision = _coco_eval(dets, gts, 2).eval["precision"][0, :, :, 0, -1]  # (101 recalls, classes), area all
    coco = precision.mean(axis=0)
    assert ours["ap"] == pytest.approx([2 / 3, 1.0]) and coco == pytest.approx([2 / 3, 1.0])


# ---------------------------------------------------------------------------- tubes


def tube(video, c, score, frames, boxes):
    boxes = np.asarray(boxes, dtype=float)
    if boxes.ndim == 1:
        boxes = np.tile(boxes, (len(frames), 1))
    return Tube(video, c, score, np.asarray(frames), boxes)


def test_tube_checks_its_shape():
    with pytest.raises(ValueError, match="2 frames for 1 boxes"):
        Tube("v", 0, 1.0, [0, 1], [A])
    with pytest.raises(ValueError, match="sorted without repeats"):
        Tube("v", 0, 1.0, [1, 1], [A, A])


def test_fill_tube_takes_the_nearest_box():
    t = Tube("v", 0, 0.5, [0, 4, 9], [[0, 0, 1, 1], [4, 4, 5, 5], [9, 9, 10, 10]], scores=[0.1, 0.4, 0.9])
    f = tube_metrics.fill_tube(t)
    assert f.frames.tolist() == list(range(10))
    # frame 2 is as far from 0 as from 4: the earlier box; frame 7 nearer 9
    assert f.boxes[:, 0].tolist() == [0, 0, 0, 4, 4, 4, 4, 9, 9, 9]
    assert f.scores.tolist() == [0.1, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4, 0.9, 0.9, 0.9]
    assert tube_metrics.fill_tube(f) is f


def test_spatio_temporal_iou_by_hand():
    a = tube("v", 0, 1, range(0, 4), [0, 0, 9, 9])
    b = tube("v", 0, 1, range(2, 6), [0, 0, 4, 9])  # 2 shared frames of a 6-frame union, box IoU 50/100
    assert tube_metrics.spatio_temporal_iou(a, b) == pytest.approx(2 / 6 * 0.5)
    assert tube_metrics.spatio_temporal_iou(a, a) == 1.0
    assert tube_metrics.spatio_temporal_iou(a, tube("v", 0, 1, range(4, 8), [0, 0, 9, 9])) == 0.0
    assert tube_metrics.spatio_temporal_iou(a, tube("v", 0, 1, [3], [0, 0, 9, 9])) == pytest.approx(1 / 4)


def test_nms_tubes_per_video_and_class():
    best = tube("v", 0, 0.9, range(10), A)
    dup = tube("v", 0, 0.8, range(1, 10), A)             # ST-IoU 0.9 with best: dropped
    late = tube("v", 0, 0.7, range(7, 10), A)            # ST-IoU 0.3, not above the threshold: kept
    other_class = tube("v", 1, 0.5, range(10), A)
    other_video = tube("w", 0, 0.4, range(10), A)
    kept = tube_metrics.nms_tubes([dup, late, best, other_class, other_video], 0.3)
    assert kept == [late, best, other_class, other_video]


def test_video_map_tube_that_starts_late():
    gts = [tube("v", 0, 1, range(10), A)]
    late = [tube("v", 0, 0.9, range(6, 10), A)]          # temporal IoU 4/10, spatial 1
    assert tube_metrics.video_map(late, gts, 1, iou_threshold=0.2)["ap"] == [1.0]
    assert tube_metrics.video_map(late, gts, 1, iou_threshold=0.5)["ap"] == [0.0]
    # the gaps of a predicted tube are filled before scoring: frames 0 and 9 alone span the GT
    sparse = [tube("v", 0, 0.9, [0, 9], A)]
    assert tube_metrics.video_map(sparse, gts, 1, iou_threshold=0.99)["ap"] == [1.0]


def test_video_map_duplicates_nms_and_a_class_never_predicted():
    gts = [tube("v1", 0, 1, range(10), A), tube("v2", 0, 1, range(10), A), tube("v1", 1, 1, range(5), A)]
    preds = [tube("v1", 0, 0.9, range(10), A),
             tube("v1", 0, 0.8, range(10), [2, 2, 101, 101]),  # duplicate, ST-IoU 0.92
             tube("v2", 0, 0.7, range(10), A),
             tube("v3", 2, 0.6, range(3), A)]                  # class 2 has no GT anywhere
    with_nms = tube_metrics.video_map(preds, gts, 3, iou_threshold=0.5)
    assert with_nms["ap"][:2] == [1.0, 0.0] and math.isnan(with_nms["ap"][2])
    assert with_nms["map"] == 0.5 and with_nms["num_gt"] == [2, 1, 0]
    without = tube_metrics.video_map(preds, gts, 3, iou_threshold=0.5, nms_threshold=None)
    assert without["ap"][0] == pytest.approx(0.5 + 0.5 * 2 / 3)  # TP, FP, TP
    trap = tube_metrics.video_map(preds, gts, 3, iou_threshold=0.5, nms_threshold=None, ap_mode="trapezoid")
    assert trap["ap"][0] == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)


def test_video_map_two_actors_best_unmatched_tube():
    a, b = A, [50, 0, 149, 99]
    gts = [tube("v", 0, 1, range(8), a), tube("v", 0, 1, range(8), b)]
    preds = [tube("v", 0, 0.9, range(8), a), tube("v", 0, 0.8, range(8), [20, 0, 119, 99])]
    # NMS off: the two predictions overlap (ST-IoU 0.67) but follow two actors
    assert tube_metrics.video_map(preds, gts, 1, 0.5, nms_threshold=None)["ap"] == [1.0]
    assert tube_metrics.video_map(preds, gts, 1, 0.5)["ap"] == [0.5]  # NMS at 0.3 drops the second


def test_tubes_from_tracks_splits_and_interpolates():
    rows = [("v", 0, 7, 0, 0, 0, 10, 10), ("v", 2, 7, 0, 2, 2, 12, 12),   # gap of 2: interpolated
            ("v", 10, 7, 0, 5, 5, 15, 15),                                # gap of 8 > max_gap: a new tube
            ("v", 0, 7, 1, 0, 0, 10, 10),                                 # same track, a second action
            ("w", 4, 1, 0, 1, 1, 2, 2)]
    tubes = tube_metrics.tubes_from_tracks(rows, max_gap=3)
    assert [(t.video, t.class_id, t.frames.tolist()) for t in tubes] == [
        ("v", 0, [0, 1, 2]), ("v", 0, [10]), ("v", 1, [0]), ("w", 0, [4])]
    assert tubes[0].boxes[1].tolist() == [1, 1, 11, 11] and tubes[0].score == 1.0
    assert [len(t.frames) for t in tube_metrics.tubes_from_tracks(rows)] == [11, 1, 1]


# ----------------------------------------------------------------------------- STAR's predictions as tubes

def _clip_target(frames, labels, boxes_cxcywh):
    return {"frame_indices": torch.tensor(frames), "track_labels": torch.tensor(labels),
            "track_boxes": torch.tensor(boxes_cxcywh, dtype=torch.float32)}


def test_tube_scorer_on_a_clip_prediction_constant_over_the_clip():
    """One actor (class 1) at steps 1-3 of frames 0, 10, 20, 30 at (0.2-0.4, 0.2-0.4); a clip-mode query with that
    box stands at all four frames: frame 0 (ranked first among equal scores) is a false positive, then three hits:
    precision 3/4 at full recall, frame-mAP 0.75; its tube spans 0-30 against the truth's 10-30 (temporal IoU 0.75
    x box IoU 1): a hit at 0.2 and 0.5; a query with a wrong box scores 0."""
    box = [0.3, 0.3, 0.2, 0.2]
    target = _clip_target([0, 10, 20, 30], [[-1, 1, 1, 1]], [[[0, 0, 0, 0], box, box, box]])
    good = {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.2, 0.4, 0.4]])}
    scorer = tube_metrics.TubeScorer(2)
    scorer.add_clip_predictions("v", target["frame_indices"], good, 100, 50)
    scorer.add_clip_truth("v", target, 100, 50)
    assert len(scorer.ground_truth) == 3 and len(scorer.gt_tubes) == 1
    assert scorer.result() == pytest.approx({"frame_map50": 0.75, "video_map20": 1.0, "video_map50": 1.0})
    bad = dict(good, boxes=torch.tensor([[0.6, 0.6, 0.9, 0.9]]))
    scorer = tube_metrics.TubeScorer(2)
    scorer.add_clip_predictions("v", target["frame_indices"], bad, 100, 50)
    scorer.add_clip_truth("v", target, 100, 50)
    assert scorer.result() == pytest.approx({"frame_map50": 0.0, "video_map20": 0.0, "video_map50": 0.0})


def test_tube_scorer_whole_video_truth_and_a_late_start():
    """Truth frames 0-9 of class 0; a prediction over frames 5-14 with the same box and one score (ties keep the
    frames' order): 5 hits then 5 misses, recall 0.5 at precision 1 -> VOC AP 0.5; tube temporal IoU 5/15 = 0.33:
    a hit at 0.2 only."""
    scorer = tube_metrics.TubeScorer(1)
    box = [0.1, 0.1, 0.5, 0.5]
    scorer.add_truth("v", 0, np.arange(10), np.repeat([box], 10, 0), 64, 48)
    scorer.add_prediction("v", np.arange(5, 15), 0, 0.8, box, 64, 48)
    result = scorer.result()
    assert result["frame_map50"] == pytest.approx(0.5)
    assert (result["video_map20"], result["video_map50"]) == (1.0, 0.0)
    assert tube_metrics.TubeScorer(1).result() == {}                       # no ground truth: nothing to report
