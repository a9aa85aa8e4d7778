"""Tests for postprocess.py, metrics.py and plots.py: hand-computed cases and AP against torchmetrics (pycocotools
backend)."""

import json
import math

import numpy as np
import pytest
import torch

import metrics
import plots
import postprocess

NAMES = ["fight", "collapse"]


def pred(rows):
    """Prediction dict from rows ``(score, label, x1, y1, x2, y2)`` (normalised xyxy)."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"scores": t[:, 0], "labels": t[:, 1].long(), "boxes": t[:, 2:]}


def target(rows):
    """Target dict from rows ``(label, x1, y1, x2, y2)``; [] = video without action."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return {"labels": t[:, 0].long(), "boxes": t[:, 1:]}


BOX_A = [0.1, 0.1, 0.5, 0.5]
BOX_B = [0.5, 0.5, 0.9, 0.9]
FAR = [0.0, 0.0, 0.05, 0.05]


# --------------------------------------------------------------------------- conversion


def test_outputs_to_predictions_hand_softmax():
    ln = math.log
    logits = torch.tensor([[[ln(2), 0.0, 0.0],         # softmax 1/2, 1/4, 1/4
                            [0.0, ln(3), ln(4)]]])     # softmax 1/8, 3/8, 4/8 (no_object wins)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.95, 0.5, 0.2, 0.2]]])
    (p,) = postprocess.outputs_to_predictions({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []})
    assert p["scores"].dtype == torch.float32 and p["labels"].dtype == torch.int64
    assert p["boxes"].dtype == torch.float32 and p["boxes"].shape == (2, 4)
    torch.testing.assert_close(p["scores"], torch.tensor([0.5, 0.375]))
    assert p["labels"].tolist() == [0, 1]
    # cxcywh -> xyxy, the second box clamped at x2 = 1.
    torch.testing.assert_close(p["boxes"], torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.85, 0.4, 1.0, 0.6]]))


def test_outputs_to_predictions_batch_and_grad():
    logits = torch.randn(3, 12, 4, requires_grad=True)
    boxes = torch.rand(3, 12, 4)
    preds = postprocess.outputs_to_predictions({"pred_logits": logits, "pred_boxes": boxes})
    assert len(preds) == 3
    for b, p in enumerate(preds):
        probs = logits[b].detach().softmax(-1)
        torch.testing.assert_close(p["scores"], probs[:, :3].max(-1).values)
        assert p["scores"].shape == (12,) and not p["scores"].requires_grad
        assert p["boxes"].min() >= 0 and p["boxes"].max() <= 1


# --------------------------------------------------------------------------- video level


def test_video_prediction_threshold():
    p = pred([[0.3, 1] + BOX_A, [0.6, 0] + BOX_B])
    label, score, box = postprocess.video_prediction(p, threshold=0.5)
    assert (label, score) == (0, pytest.approx(0.6)) and box.tolist() == pytest.approx(BOX_B)
    assert postprocess.video_prediction(p, threshold=0.6)[0] == 0  # score == threshold keeps the class
    label, score, box = postprocess.video_prediction(p, threshold=0.7)
    assert label == -1 and score == pytest.approx(0.6) and box is not None


def test_video_accuracy_perfect_wrong_noobject_multi():
    targets = [target([[0] + BOX_A]), target([[1] + BOX_B]), target([])]
    perfect = [pred([[0.9, 0] + BOX_A]), pred([[0.8, 1] + BOX_B]), pred([[0.1, 0] + BOX_A])]
    assert metrics.video_accuracy(perfect, targets) == 1.0
    wrong = [pred([[0.9, 1] + BOX_A]), pred([[0.4, 1] + BOX_B]), pred([[0.7, 0] + BOX_A])]
    assert metrics.video_accuracy(wrong, targets) == 0.0  # wrong class, below threshold, false alarm
    # Multi-instance video: either of its classes is right; the box plays no part.
    multi = [target([[0] + BOX_A, [1] + BOX_B])]
    assert metrics.video_accuracy([pred([[0.9, 1] + FAR])], multi) == 1.0
    assert metrics.video_accuracy([pred([[0.9, 0] + FAR])], multi) == 1.0
    assert metrics.video_accuracy([pred([[0.2, 0] + FAR])], multi) == 0.0
    # Threshold moves the decision.
    assert metrics.video_accuracy(wrong[1:2], targets[1:2], threshold=0.3) == 1.0
    assert math.isnan(metrics.video_accuracy([], []))


def test_video_accuracy_uses_top_query_only():
    # The correct class is present but not on the top query.
    p = pred([[0.6, 1] + BOX_A, [0.55, 0] + BOX_A])
    assert metrics.video_accuracy([p], [target([[0] + BOX_A])]) == 0.0


def test_detection_accuracy_cases():
    half = [0.1, 0.1, 0.5, 0.3]  # IoU with BOX_A exactly 0.5
    cases = [
        (pred([[0.9, 0] + BOX_A]), target([[0] + BOX_A]), 1.0),    # perfect
        (pred([[0.9, 0] + half]), target([[0] + BOX_A]), 1.0),     # IoU == 0.5 counts
        (pred([[0.9, 0] + FAR]), target([[0] + BOX_A]), 0.0),      # right class, wrong place
        (pred([[0.9, 1] + BOX_A]), target([[0] + BOX_A]), 0.0),    # right place, wrong class
        (pred([[0.4, 0] + BOX_A]), target([[0] + BOX_A]), 0.0),    # below threshold
        # multi-instance: box must overlap a GT box of the predicted class
        (pred([[0.9, 1] + BOX_B]), target([[0] + BOX_A, [1] + BOX_B]), 1.0),
        (pred([[0.9, 1] + BOX_A]), target([[0] + BOX_A, [1] + BOX_B]), 0.0),
        (pred([[0.9, 0] + BOX_B]), target([[0] + BOX_A, [0] + BOX_B]), 1.0),
    ]
    for p, t, expected in cases:
        assert metrics.detection_accuracy([p], [t]) == expected, (p, t)
    # no_object videos are left out of the average, whatever is predicted there.
    preds = [c[0] for c in cases] + [pred([[0.9, 0] + BOX_A])]
    targets = [c[1] for c in cases] + [target([])]
    assert metrics.detection_accuracy(preds, targets) == pytest.approx(4 / 8)
    assert math.isnan(metrics.detection_accuracy([pred([[0.9, 0] + BOX_A])], [target([])]))
    assert metrics.detection_accuracy(cases[4][:1], cases[4][1:2], threshold=0.3) == 1.0
    assert metrics.detection_accuracy(cases[1][:1], cases[1][1:2], iou=0.6) == 0.0


def test_mean_matched_iou():
    preds = [
        pred([[0.9, 1] + [0.1, 0.1, 0.5, 0.3], [0.1, 0] + BOX_A]),  # top box: IoU 0.5 (class ignored)
        pred([[0.2, 0] + BOX_B]),                                  # best of two GT boxes: 1.0
        pred([[0.9, 0] + BOX_A]),                                  # negative video: ignored
        pred([[0.9, 0] + FAR]),                                    # no overlap: 0.0
    ]
    targets = [target([[0] + BOX_A]), target([[0] + BOX_A, [1] + BOX_B]), target([]), target([[1] + BOX_B])]
    assert metrics.mean_matched_iou(preds, targets) == pytest.approx(0.5)
    assert math.isnan(metrics.mean_matched_iou(preds[2:3], targets[2:3]))


# --------------------------------------------------------------------------- average precision


def test_ap_hand_computed():
    # One class, two GT boxes; detections by score: TP, FP, TP.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1 up to recall 0.5, then 2/3.
    preds = [pred([[0.9, 0] + BOX_A, [0.8, 0] + FAR]), pred([[0.7, 0] + BOX_B])]
    targets = [target([[0] + BOX_A]), target([[0] + BOX_B])]
    res = metrics.average_precision(preds, targets, num_classes=2, iou_thresholds=(0.5,))
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert res["per_class"][0] == pytest.approx(expected)
    assert res["per_class"][1] is None  # no GT: not defined, not in the mean
    assert res["map"] == pytest.approx(expected)


def test_ap_perfect_missing_and_coco_thresholds():
    preds = [pred([[0.9, 0] + BOX_A]), pred([[0.9, 1] + BOX_B])]
    targets = [target([[0] + BOX_A]), target([[1] + BOX_B])]
    res = metrics.average_precision(preds, targets, 2)
    assert res["per_class"] == pytest.approx([1.0, 1.0]) and res["map"] == pytest.approx(1.0)
    # Class 1 has GT but no detection of its class: AP 0, in the mean.
    # The stray class-0 detection outscores the true one: FP then TP, envelope 1/2 everywhere.
    preds[1] = pred([[0.95, 0] + BOX_B])
    res = metrics.average_precision(preds, targets, 2, iou_thresholds=(0.5,))
    assert res["per_class"][1] == 0.0
    assert res["per_class"][0] == pytest.approx(0.5)
    assert res["map"] == pytest.approx(0.25)
    # IoU 0.6 box: a hit at 0.5 and 0.55 and 0.6, a miss above -> 3 of 10 thresholds.
    p = pred([[0.9, 0, 0.1, 0.1, 0.5, 0.34]])  # IoU with BOX_A = 0.24/0.4 = 0.6
    res = metrics.average_precision([p], [target([[0] + BOX_A])], 1)
    assert res["per_class"][0] == pytest.approx(0.3)
    assert math.isnan(metrics.average_precision([p], [target([])], 1)["map"])


def _random_case(seed, num_videos, num_classes):
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 0.7
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.02
        return torch.cat([xy, xy + wh], 1)

    preds, targets = [], []
    for _ in range(num_videos):
        n = int(torch.randint(0, 4, (1,), generator=g))
        gt_boxes, gt_labels = boxes(n), torch.randint(0, num_classes, (n,), generator=g)
        # Some queries near the GT boxes with mostly the right class, the rest random.
        near = (gt_boxes + 0.04 * torch.randn(n, 4, generator=g)).clamp(0, 1)
        noisy_labels = torch.where(torch.rand(n, generator=g) < 0.7, gt_labels,
                                   torch.randint(0, num_classes, (n,), generator=g))
        preds.append({
            "scores": torch.rand(12, generator=g),
            "labels": torch.cat([noisy_labels, torch.randint(0, num_classes, (12 - n,), generator=g)]),
            "boxes": torch.cat([near, boxes(12 - n)]),
        })
        targets.append({"labels": gt_labels, "boxes": gt_boxes})
    return preds, targets


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresholds", [(0.5,), None])
def test_ap_matches_torchmetrics(seed, thresholds):
    from torchmetrics.detection import MeanAveragePrecision

    num_classes = 3
    preds, targets = _random_case(seed, num_videos=6 + 4 * seed, num_classes=num_classes)
    ious = list(thresholds) if thresholds else list(metrics.COCO_IOU_THRESHOLDS)
    # torchmetrics' default recall points come from float32 torch.linspace (0.4 -> 0.40000001),
    # which drops a point whenever a recall lands exactly on one (2 of 5 GT); COCO's own points
    # are float64 np.linspace, so hand those over to compare with COCO's definition.
    rec = np.linspace(0.0, 1.0, 101).tolist()
    ref = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", iou_thresholds=ious,
                               rec_thresholds=rec, class_metrics=True, backend="pycocotools")
    ref.update(preds, targets)
    expected = ref.compute()
    ours = metrics.average_precision(preds, targets, num_classes, iou_thresholds=ious)
    assert ours["map"] == pytest.approx(float(expected["map"]), abs=1e-4)
    ref_per_class = dict(zip(expected["classes"].tolist(), expected["map_per_class"].tolist()))
    for c in range(num_classes):
        ref_ap = ref_per_class.get(c, -1.0)
        if ref_ap < 0:  # torchmetrics' -1 = class without GT
            assert ours["per_class"][c] is None
        else:
            assert ours["per_class"][c] == pytest.approx(ref_ap, abs=1e-4)


# --------------------------------------------------------------------------- confusion matrix


def _cm_case():
    preds = [
        pred([[0.9, 0] + BOX_A]),  # GT fight -> fight
        pred([[0.9, 1] + BOX_A]),  # GT fight -> collapse
        pred([[0.2, 1] + BOX_A]),  # GT collapse -> no_object
        pred([[0.9, 1] + BOX_A]),  # GT {fight, collapse} -> collapse: counted as collapse row
        pred([[0.9, 1] + BOX_A]),  # GT no_object -> collapse
        pred([[0.1, 0] + BOX_A]),  # GT no_object -> no_object
        pred([[0.9, 0] + BOX_A]),  # GT {collapse, collapse} -> fight: row = first GT (collapse)
    ]
    targets = [
        target([[0] + BOX_A]), target([[0] + BOX_A]), target([[1] + BOX_A]),
        target([[0] + BOX_A, [1] + BOX_B]), target([]), target([]),
        target([[1] + BOX_A, [1] + BOX_B]),
    ]
    return preds, targets


def test_confusion_matrix_hand_case():
    preds, targets = _cm_case()
    cm = metrics.confusion_matrix(preds, targets, num_classes=2)
    assert cm.tolist() == [[1, 1, 0],
                           [1, 1, 1],
                           [0, 1, 1]]
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics.video_accuracy(preds, targets))
    report = metrics.per_class_report(cm, NAMES + ["no_object"])
    assert report["fight"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["collapse"]["precision"] == pytest.approx(1 / 3)
    assert report["collapse"]["recall"] == pytest.approx(1 / 3)
    assert report["no_object"]["precision"] == pytest.approx(0.5)
    assert report["no_object"]["recall"] == pytest.approx(0.5)
    # A class never predicted nor present: zero-division gives 0, not NaN.
    empty = metrics.per_class_report(np.zeros((2, 2), int), ["a", "no_object"])
    assert empty["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_plot_confusion_matrix_writes_png(tmp_path):
    preds, targets = _cm_case()
    cm = metrics.confusion_matrix(preds, targets, 2)
    path = tmp_path / "cm.png"
    plots.plot_confusion_matrix(cm, NAMES, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix(cm, ["only_one"], tmp_path / "bad.png")


# --------------------------------------------------------------------------- summary


def test_evaluate_report_and_best_score():
    preds, targets = _cm_case()
    res = metrics.evaluate(preds, targets, NAMES, threshold=0.5)
    for key in ("video_acc", "det_acc_50", "mean_iou", "ap50", "map50", "map50_95",
                "confusion_matrix", "per_class", "num_videos"):
        assert key in res
    assert res["num_videos"] == 7 and res["num_positive"] == 5
    assert res["video_acc"] == pytest.approx(3 / 7)
    # Positives: v0 hit, v1 wrong class, v2 below threshold, v3 collapse box is BOX_A but
    # collapse GT is BOX_B (miss), v6 wrong class -> 1/5.
    assert res["det_acc_50"] == pytest.approx(1 / 5)
    assert set(res["ap50"]) == set(NAMES)
    assert set(res["per_class"]) == set(NAMES + ["no_object"])
    json.dumps(res)  # plain Python values only
    assert metrics.best_score(res) == pytest.approx(3 / 7 + 0.2 / 5)
    assert metrics.best_score({"video_acc": 0.5, "det_acc_50": float("nan")}) == 0.5
    text = metrics.format_report(res, NAMES)
    for word in ("video accuracy", "det-acc@0.5", "mAP@0.5", "fight", "collapse", "no_object"):
        assert word in text


def test_evaluate_accepts_numpy_and_empty_class():
    preds = [{"scores": np.array([0.9, 0.1], np.float32), "labels": np.array([0, 0]),
              "boxes": np.array([BOX_A, FAR], np.float32)}]
    targets = [{"labels": np.array([0]), "boxes": np.array([BOX_A], np.float32)}]
    res = metrics.evaluate(preds, targets, NAMES)
    assert res["video_acc"] == 1.0 and res["det_acc_50"] == 1.0 and res["mean_iou"] == pytest.approx(1.0)
    assert res["ap50"] == {"fight": pytest.approx(1.0), "collapse": None}
    assert res["map50"] == pytest.approx(1.0) and res["map50_95"] == pytest.approx(1.0)
    assert "n/a" in metrics.format_report(res, NAMES)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.video_accuracy([pred([[0.9, 0] + BOX_A])], [])
