"""Tubes of predictions (tubes.py) and their outputs (inference.py, test.py): step boxes interpolated to every frame,
presence by the nearest step, joining across windows (one id per actor, pauses), predictions_frames.csv and the
annotated video of a tiny tube-mode checkpoint (8 frames, 64 px, 4 queries) on small generated videos."""
from __future__ import annotations

import csv
import itertools
import math
import types

import av
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import checkpoint
import detections
import inference
import model as star_model
import scoring
import tubes
import video
from conftest import write_video
from cutting import choose_cut
from model_description import ModelDescription

import test as test_cli  # noqa: E402  (ours: tests/test_inference.py checks it is not the standard library's)

NAMES = ["fight", "collapse"]
FRAME_FIELDS = ["video_name", "tube_id", "frame", "time_sec", "pred_class", "score", "x1", "y1", "x2", "y2"]
TUBE_ARGS = {"num_queries": 4, "tube_steps": 8, "dim_feedforward": 64, "num_decoder_layers": 2, "max_positions": 1000}
TUBE_PREP = {"num_frames": 8, "img_size": 64, "mean": list(video.IMAGENET_MEAN),
             "std": list(video.IMAGENET_STD), "window_sec": None}
FIXED_BOX = (0.3, 0.3, 0.7, 0.7)   # xyxy of the confident model's every box: cxcywh (0.5, 0.5, 0.4, 0.4)


def _pred(step_scores, step_boxes, labels=None) -> dict:
    """A tube-mode prediction as postprocess.outputs_to_predictions makes it (only the keys tubes.py reads)."""
    scores = torch.tensor(step_scores, dtype=torch.float32).reshape(len(step_scores), -1)
    boxes = torch.tensor(step_boxes, dtype=torch.float32).reshape(*scores.shape, 4)
    labels = torch.zeros(len(scores), dtype=torch.int64) if labels is None else torch.tensor(labels)
    return {"scores": scores.max(1).values, "labels": labels, "boxes": boxes[:, 0], "step_scores": scores,
            "step_boxes": boxes, "step_acting": scores}   # one class: acting is its probability


# --------------------------------------------------------------------------- one clip


def test_step_boxes_interpolated_to_every_frame():
    """Steps at frames 0, 4, 8 of a 9-frame span, all present: frame 1 is 1/4 of the way from step 0 to step 1."""
    boxes = [[0.0, 0.0, 0.2, 0.2], [0.4, 0.0, 0.6, 0.2], [0.4, 0.4, 0.6, 0.6]]
    (tube,) = tubes.clip_tubes(_pred([[0.9, 0.8, 0.7]], [boxes], [1]), [0, 4, 8], (0, 9), 0.5, NAMES)
    assert (tube.class_id, tube.class_name) == (1, "collapse")
    assert tube.score == pytest.approx(0.8)                     # mean of the present steps
    assert tube.frames.tolist() == list(range(9))
    np.testing.assert_allclose(tube.boxes[1], [0.1, 0.0, 0.3, 0.2], atol=1e-6)
    np.testing.assert_allclose(tube.boxes[6], [0.4, 0.2, 0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(tube.boxes[[0, 4, 8]], boxes, atol=1e-6)
    np.testing.assert_allclose(tube.frame_scores[[0, 2, 6]], [0.9, 0.85, 0.75], atol=1e-6)
    assert tube.middle_box() == pytest.approx((0.4, 0.0, 0.6, 0.2))   # frame 4 of 0-8
    # Steps inside a longer span: the first and last steps' boxes are held outside them.
    (held,) = tubes.clip_tubes(_pred([[0.9, 0.8, 0.7]], [boxes], [1]), [2, 4, 6], (0, 9), 0.5, NAMES)
    np.testing.assert_allclose(held.boxes[[0, 1, 2]], [boxes[0]] * 3, atol=1e-6)
    np.testing.assert_allclose(held.boxes[[6, 7, 8]], [boxes[2]] * 3, atol=1e-6)
    np.testing.assert_allclose(held.boxes[3], [0.2, 0.0, 0.4, 0.2], atol=1e-6)


def test_presence_follows_the_nearest_step_ties_to_the_earlier():
    """Steps at 0, 4, 8: present, absent, present. Frame 2 is halfway (the earlier step, present), frame 6 too (the
    earlier step, absent); a query below the threshold at every step is no tube."""
    boxes = [[0.0, 0.0, 0.2, 0.2], [0.4, 0.0, 0.6, 0.2], [0.4, 0.4, 0.6, 0.6]]
    pred = _pred([[0.9, 0.1, 0.9], [0.2, 0.3, 0.4]], [boxes, boxes], [0, 1])
    (tube,) = tubes.clip_tubes(pred, [0, 4, 8], (0, 9), 0.5, NAMES)
    assert tube.frames.tolist() == [0, 1, 2, 7, 8]
    assert tube.score == pytest.approx(0.9)
    np.testing.assert_allclose(tube.boxes[2], [0.2, 0.0, 0.4, 0.2], atol=1e-6)   # boxes interpolate through step 1
    assert tube.frame_scores[2] == pytest.approx(0.5)
    assert tubes.nearest_step([0, 4, 8], [2, 3, 6, 7]).tolist() == [0, 1, 1, 2]
    # A 2-frame video sampled at 4 steps repeats frames: the earlier step of a frame speaks for it.
    assert tubes.nearest_step([0, 0, 1, 1], [0, 1]).tolist() == [0, 2]
    (short,) = tubes.clip_tubes(_pred([[0.1, 0.9, 0.9, 0.1]], [[boxes[0]] * 4]), [0, 0, 1, 1], (0, 2), 0.5, NAMES)
    assert short.frames.tolist() == [1]


# --------------------------------------------------------------------------- joining windows


WINDOWS = [(0, 20), (10, 30), (20, 40)]   # 2-s windows every second at 10 fps


def _actor(frame, x0, speed=0.005):
    """An actor's normalised xyxy box at ``frame``: 0.2 wide, moving right."""
    x = x0 + speed * frame
    return [x, 0.3, x + 0.2, 0.7]


def _window_clips(actors, scores):
    """Per window: the tubes of a prediction whose query q follows actor q (x0 in ``actors``)."""
    clips = []
    for first, end in WINDOWS:
        steps = first + video.sample_indices(end - first, 8)
        boxes = [[_actor(f, x0) for f in steps] for x0 in actors]
        pred = _pred([[s] * 8 for s in scores], boxes)
        clips.append(tubes.clip_tubes(pred, steps, (first, end), 0.5, NAMES))
    return clips


def test_one_actor_across_three_windows_keeps_one_id():
    (tube,) = tubes.join_tubes(_window_clips([0.1], [0.9]), detections.JOIN_IOU, max_gap=10)
    assert tube.tube_id == 1 and tube.frames.tolist() == list(range(40))
    np.testing.assert_allclose(tube.boxes[[0, 15, 39]], [_actor(0, 0.1), _actor(15, 0.1), _actor(39, 0.1)], atol=1e-6)
    assert tube.score == pytest.approx(0.9) and len(tube.step_scores) == 24


def test_two_actors_side_by_side_keep_two_ids():
    joined = tubes.join_tubes(_window_clips([0.1, 0.5], [0.8, 0.9]), detections.JOIN_IOU, max_gap=10)
    assert [t.tube_id for t in joined] == [1, 2]
    assert all(t.frames.tolist() == list(range(40)) for t in joined)
    # Both start at frame 0: the higher-scoring one (the right actor) is numbered first.
    np.testing.assert_allclose(joined[0].boxes[30], _actor(30, 0.5), atol=1e-6)
    np.testing.assert_allclose(joined[1].boxes[30], _actor(30, 0.1), atol=1e-6)


def test_shared_frames_take_the_higher_scoring_tubes_box():
    low = tubes.constant_tube(0, "fight", 0.6, [0.1, 0.1, 0.5, 0.5], range(0, 20))
    high = tubes.constant_tube(0, "fight", 0.9, [0.12, 0.1, 0.52, 0.5], range(10, 30))
    (tube,) = tubes.join_tubes([[low], [high]], detections.JOIN_IOU, max_gap=10)
    np.testing.assert_allclose(tube.boxes[[9, 10, 29]], [[0.1, 0.1, 0.5, 0.5]] + [[0.12, 0.1, 0.52, 0.5]] * 2)
    assert tube.score == pytest.approx(0.75)   # the mean of both tubes' steps (one each here)


def test_a_short_pause_keeps_the_id_a_long_one_gives_a_new_one():
    box = [0.1, 0.1, 0.5, 0.5]
    for gap, ids in ((6, [1]), (10, [1]), (11, [1, 2])):
        before = tubes.constant_tube(0, "fight", 0.9, box, range(0, 20))
        after = tubes.constant_tube(0, "fight", 0.8, box, range(20 + gap, 40 + gap))
        joined = tubes.join_tubes([[before], [after]], detections.JOIN_IOU, max_gap=10)
        assert [t.tube_id for t in joined] == ids, gap
        assert joined[-1].frames[-1] == 39 + gap
    # Inside one clip: a query present at steps 0-1 and 6-7 of 80 frames is missing for frames 17-61 (45 frames).
    steps = video.sample_indices(80, 8)                                   # 0 11 22 33 45 56 67 79
    pred = _pred([[0.9, 0.7, 0.1, 0.1, 0.1, 0.1, 0.6, 0.8]], [[box] * 8])
    clip = tubes.clip_tubes(pred, steps, (0, 80), 0.5, NAMES)
    (kept,) = tubes.join_tubes([clip], detections.JOIN_IOU, max_gap=45)
    assert kept.frames.tolist() == list(range(0, 17)) + list(range(62, 80))
    first, second = tubes.join_tubes([clip], detections.JOIN_IOU, max_gap=44)
    assert (first.tube_id, first.frames[-1], second.tube_id, second.frames[0]) == (1, 16, 2, 62)
    assert (first.score, second.score) == (pytest.approx(0.8), pytest.approx(0.7))


def test_joined_tubes_shorter_than_min_frames_are_dropped_before_numbering():
    """Two actors far apart: one for frames 0-13 (14 frames), one for 20-34 (15): at min_frames 15 only the second
    stays, numbered 1; at the default both."""
    short = tubes.constant_tube(0, "fight", 0.9, [0.1, 0.1, 0.3, 0.3], range(0, 14))
    long = tubes.constant_tube(1, "collapse", 0.5, [0.6, 0.6, 0.9, 0.9], range(20, 35))
    (kept,) = tubes.join_tubes([[short, long]], detections.JOIN_IOU, max_gap=10, min_frames=15)
    assert (kept.tube_id, kept.class_id, int(kept.frames[0])) == (1, 1, 20)
    assert [t.tube_id for t in tubes.join_tubes([[short, long]], detections.JOIN_IOU, max_gap=10)] == [1, 2]


def test_other_class_far_box_and_a_second_tube_of_one_window_do_not_join():
    box, far = [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]
    clips = [[tubes.constant_tube(0, "fight", 0.9, box, range(0, 20))],
             [tubes.constant_tube(1, "collapse", 0.9, box, range(10, 30)),
              tubes.constant_tube(0, "fight", 0.8, far, range(10, 30))]]
    joined = tubes.join_tubes(clips, detections.JOIN_IOU, max_gap=10)
    assert [(t.tube_id, t.class_id, int(t.frames[0])) for t in joined] == [(1, 0, 0), (2, 1, 10), (3, 0, 10)]
    # Two tubes of one window are two queries, never one actor here: merge_duplicate_queries merges them before.
    twins = [tubes.constant_tube(0, "fight", 0.7, box, range(10, 30)),
             tubes.constant_tube(0, "fight", 0.8, [0.11, 0.1, 0.51, 0.5], range(10, 30))]
    joined = tubes.join_tubes([clips[0], twins], detections.JOIN_IOU, max_gap=10)
    assert [(t.tube_id, int(t.frames[0]), int(t.frames[-1]), round(t.score, 2)) for t in joined] == [
        (1, 0, 29, 0.85), (2, 10, 29, 0.7)]


def _query_pred(probs, step_boxes) -> dict:
    """A tube-mode clip prediction from each query's class probabilities ``probs (Q, K, C)`` and xyxy ``step_boxes
    (Q, K, 4)``, its class the most probable summed over the steps, as postprocess.tube_outputs_to_predictions reads
    it."""
    probs = torch.tensor(probs, dtype=torch.float32)
    labels = probs.sum(1).argmax(-1)
    step_scores = probs.gather(-1, labels[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(-1)
    pred = _pred(step_scores.tolist(), step_boxes, labels.tolist())
    pred["step_probs"], pred["step_acting"] = probs, probs.sum(-1)
    return pred


def _probable_tube(probs, steps, boxes, span):
    """One query's tube in a clip covering ``span``, its step k at video frame ``steps[k]`` with box ``boxes[k]``:
    class probabilities ``probs`` (C,) at every step."""
    (tube,) = tubes.clip_tubes(_query_pred([[probs] * len(steps)], [boxes]), steps, span, 0.5, NAMES)
    return tube


def test_a_tube_spans_the_steps_where_its_actor_acts_whatever_class_each_says():
    """One actor acting at steps 1-3 (P(no_object) 0.2-0.3) whose steps split between two classes (0.4 / 0.35,
    0.3 / 0.4...): none passes 0.5 for one class, yet the tube covers steps 1-3, its score the mean of its class's
    (fight, the more probable summed) probabilities there; step 0 (no_object 0.9) stays out."""
    box = [0.1, 0.1, 0.5, 0.5]
    pred = _query_pred([[[0.05, 0.05], [0.4, 0.35], [0.3, 0.4], [0.45, 0.35]]], [[box] * 4])
    (tube,) = tubes.clip_tubes(pred, [0, 10, 20, 30], (0, 40), 0.5, NAMES)
    assert tube.class_id == 0 and tube.frames.tolist() == list(range(6, 40))   # frame 5: a tie, to step 0
    assert tube.score == pytest.approx((0.4 + 0.3 + 0.45) / 3)


def test_duplicate_queries_of_one_clip_are_one_query_of_the_best_ones_class():
    """Two queries on one actor (box IoU 0.90): fight 0.8 at steps 0-2 (0.1 at step 3), and collapse 0.75 (fight 0.2)
    at every step -> one fight query, the first's box and probabilities at steps 0-2, the second's at step 3 (more
    sure of fight there); a third query on another actor stays; the best first."""
    a, a_shifted, b = [0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.1, 0.9, 0.5]
    twin, lead, other = [[0.2, 0.75]] * 4, [[0.8, 0.15]] * 3 + [[0.1, 0.1]], [[0.1, 0.7]] * 4
    pred = _query_pred([twin, lead, other], [[a_shifted] * 4, [a] * 4, [b] * 4])
    merged = tubes.merge_duplicate_queries(pred, threshold=0.5)
    assert merged["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(merged["step_scores"], [[0.8, 0.8, 0.8, 0.2], [0.7] * 4], atol=1e-6)
    np.testing.assert_allclose(merged["step_boxes"], [[a, a, a, a_shifted], [b] * 4], atol=1e-6)
    np.testing.assert_allclose(merged["step_probs"], [lead[:3] + twin[3:], other], atol=1e-6)
    np.testing.assert_allclose(merged["scores"], [0.8, 0.7], atol=1e-6)
    np.testing.assert_allclose(merged["boxes"], [a, b], atol=1e-6)
    # frame-mAP's view, one per class: every query a detection of that class, each actor's queries merged, at each
    # step the member most sure of the class (the lead's fight 0.1 at step 3 gives way to the twin's 0.2).
    fight, collapse = tubes.class_detections(pred, threshold=0.5)
    assert fight["labels"].tolist() == [0, 0] and collapse["labels"].tolist() == [1, 1]
    np.testing.assert_allclose(fight["step_scores"], [[0.8, 0.8, 0.8, 0.2], [0.1] * 4], atol=1e-6)
    np.testing.assert_allclose(collapse["step_scores"], [[0.75] * 4, [0.7] * 4], atol=1e-6)
    np.testing.assert_allclose(collapse["step_boxes"], [[a_shifted] * 4, [b] * 4], atol=1e-6)
    # Below the overlap asked for they stay apart, unchanged, the best (mean score where present) first.
    apart = tubes.merge_duplicate_queries(pred, threshold=0.5, iou_threshold=0.95)
    assert apart["labels"].tolist() == [0, 1, 1]
    for key in ("step_scores", "step_boxes", "step_probs", "scores", "boxes"):
        torch.testing.assert_close(apart[key], pred[key][[1, 0, 2]])


def test_link_iou_without_shared_frames_is_the_iou_where_the_tubes_come_nearest():
    """Against the brute force nearest pair of frames (any of them on a tie), also for a tube lying inside the
    other's pause."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        frames_a = np.sort(rng.choice(60, size=rng.integers(1, 12), replace=False))
        rest = np.setdiff1d(np.arange(60), frames_a)
        frames_b = np.sort(rng.choice(rest, size=rng.integers(1, 12), replace=False))
        xy = rng.uniform(0, 0.5, size=(len(frames_a) + len(frames_b), 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, size=xy.shape)], 1)
        a, b = (tubes.PredTube(0, "fight", 0.9, f, box, np.ones(len(f)), f[:1], np.ones(1))
                for f, box in ((frames_a, boxes[:len(frames_a)]), (frames_b, boxes[len(frames_a):])))
        distance = np.abs(frames_a[:, None] - frames_b[None])
        gap = distance.min() - 1
        ious = box_iou(torch.tensor(a.boxes), torch.tensor(b.boxes)).numpy()[distance == distance.min()]   # ties
        for max_gap in (0, 3, 60):
            iou = tubes.link_iou(a, b, max_gap)
            assert (min(abs(ious - iou)) < 1e-9) if gap <= max_gap else iou == 0.0
    inside = tubes.constant_tube(0, "fight", 0.9, [0.1, 0.1, 0.5, 0.5], [10, 11])
    around = tubes.constant_tube(0, "fight", 0.9, [0.1, 0.1, 0.5, 0.5], [0, 1, 20, 21])
    assert tubes.link_iou(around, inside, 10) == tubes.link_iou(inside, around, 10) == pytest.approx(1.0)


def _probable_clips(window_probs, windows):
    """Per window: one actor (moving right), class probabilities ``window_probs[i]`` at every step."""
    clips = []
    for (first, end), probs in zip(windows, window_probs):
        steps = first + video.sample_indices(end - first, 8)
        clips.append([_probable_tube(probs, steps, [_actor(f, 0.1) for f in steps], (first, end))])
    return clips


def test_a_lone_window_of_another_class_joins_the_actors_tube_with_its_class():
    windows = [(0, 20), (10, 30), (20, 40), (30, 50)]
    clips = _probable_clips([[0.9, 0.05], [0.2, 0.75], [0.85, 0.1], [0.9, 0.05]], windows)
    assert [c[0].class_name for c in clips] == ["fight", "collapse", "fight", "fight"]
    (tube,) = tubes.join_tubes(clips, detections.JOIN_IOU, max_gap=10)
    assert tube.class_name == "fight" and tube.frames.tolist() == list(range(50))
    # the lone window's steps are scored as fight (0.2), not with its own best class's 0.75
    assert tube.score == pytest.approx(np.mean([0.9, 0.2, 0.85, 0.9]))
    assert tube.frame_probs.shape == (50, 2) and np.allclose(tube.frame_scores, tube.frame_probs[:, 0])


def test_a_change_of_action_the_windows_keep_showing_starts_a_new_tube():
    windows = [(10 * i, 10 * i + 20) for i in range(6)]
    clips = _probable_clips([[0.9, 0.05]] * 3 + [[0.1, 0.85]] * 3, windows)
    first, second = tubes.join_tubes(clips, detections.JOIN_IOU, max_gap=10)
    assert (first.class_name, first.tube_id, second.class_name, second.tube_id) == ("fight", 1, "collapse", 2)
    assert first.frames[0] == 0 and second.frames[-1] == 69 and second.frames[0] <= first.frames[-1] + 1
    # no switching cost: every window keeps its own class
    assert [t.class_name for t in tubes.join_tubes(clips, detections.JOIN_IOU, 10, switch_cost=0.0)] == [
        "fight", "collapse"]


@pytest.mark.parametrize("seed", range(6))
def test_part_classes_is_the_best_sequence_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, C, cost = 5, 3, float(rng.uniform(0.5, 4))
    parts = [types.SimpleNamespace(step_probs=rng.dirichlet(np.ones(C) * 0.5, size=4)) for _ in range(n)]
    evidence = np.log(np.clip(np.stack([p.step_probs.mean(0) for p in parts]), 1e-6, None))

    def total(seq):
        return sum(evidence[i, c] for i, c in enumerate(seq)) - cost * sum(a != b for a, b in zip(seq, seq[1:]))

    best = max(itertools.product(range(C), repeat=n), key=total)
    assert total(tubes.part_classes(parts, cost)) == pytest.approx(total(best))


# --------------------------------------------------------------------------- evaluation


def test_tube_mode_is_scored_per_frame_with_interpolated_boxes(tmp_path):
    """One actor (raw class 7 -> collapse) at frames 2-5 of 8, box (10, 5)-(50, 25) of 100x50, 4 fps. One clip, steps
    at frames 0, 2, 4, 7 scoring 0.1, 0.9, 0.9, 0.1; the first three steps' boxes are the actor's, the last is far.
    Frames: 2, 3, 4 (0.9) hit; frame 5 (0.63) has the box 1/3 of the way to the far one (IoU 0.22): a miss, as are
    frames 1, 6, 0, 7: frame AP = 3/4. The tube (present at frames 2-5, mean box IoU 0.80): a hit at 0.2 and 0.5."""
    data = tmp_path / "data"
    data.mkdir()
    frames = np.full((8, 50, 100, 3), 60, np.uint8)
    write_video(data / "pos.mp4", frames, fps=4)
    (data / "pos.txt").write_text("".join(f"{f} 1 7 10 5 50 25\n" for f in range(2, 6)))
    (data / "action_challenge.csv").write_text("video_file,label_file\npos.mp4,pos.txt\n")
    gt, far = [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]
    pred = _pred([[0.1, 0.9, 0.9, 0.1]], [[gt, gt, gt, far]], [1])
    pred["step_probs"] = torch.stack([(1 - pred["step_scores"]) / 2, pred["step_scores"]], -1)   # collapse: the score
    steps, span = np.array([0, 2, 4, 7]), (0, 8)
    info = video.probe_video(data / "pos.mp4")
    res = detections.VideoResult(0, "pos.mp4", str(data / "pos.mp4"), info, [], [pred], 0.9, spans=[(0.0, 2.0)],
                                 frame_indices=[steps], frame_spans=[span], tube_mode=True,
                                 clip_tubes=[tubes.clip_tubes(pred, steps, span, 0.5, NAMES)])
    detections.finish_video(res, inference.Settings(0.5))
    assert [(t.tube_id, t.frames.tolist()) for t in res.tubes] == [(1, [2, 3, 4, 5])]
    assert [(d.start_sec, d.end_sec) for d in res.detections] == [(0.5, 1.5)]
    figures = scoring.evaluate_predictions([res], data, NAMES, [3, 7], 0.5, tmp_path / "p.csv")
    assert figures["frame_map50"] == pytest.approx(0.75)
    assert figures["video_map20"] == figures["video_map50"] == 1.0
    assert figures["frame_ap50"] == {"fight": None, "collapse": pytest.approx(0.75)}      # fight has no ground truth
    assert figures["video_ap50"] == {"fight": None, "collapse": 1.0}
    report = (tmp_path / "p_metrics.txt").read_text()
    assert "frame-mAP@0.5  : 0.7500" in report and "video-mAP@0.2  : 1.0000" in report
    assert "video-mAP@0.5  : 1.0000" in report and "det-acc" not in report and "mAP@[.5:.95]" not in report
    assert "fAP50" in report.splitlines()[6] and report.splitlines()[8].split()[:3] == ["collapse", "0.7500", "1.0000"]


# --------------------------------------------------------------------------- through test.py


@pytest.fixture(scope="module")
def tube_checkpoint(tmp_path_factory):
    """A tiny tube-mode checkpoint whose every query says collapse (p ~1) at every step with the box FIXED_BOX (the
    decoder says collapse, the actionness map says acting everywhere)."""
    torch.manual_seed(0)
    net = star_model.STAR(2, **TUBE_ARGS).eval()
    with torch.no_grad():
        net.head.class_head[3].bias.zero_()
        net.head.class_head[3].bias[1] = 20.0
        net.head.bbox_head[6].weight.zero_()
        net.head.bbox_head[6].bias.copy_(torch.tensor([0.0, 0.0, math.log(0.4 / 0.6), math.log(0.4 / 0.6)]))
        net.locate.query.weight.zero_()   # the locator attends symmetrically about the middle: centre 0.5, and the
        net.locate.query.bias.zero_()     # head's offset is 0
        net.locate.anchors.fill_(0.5)
        net.acting.out.weight.zero_()   # every cell acts (p ~1)
        net.acting.out.bias.fill_(20.0)
    ck = checkpoint.make_checkpoint(net, checkpoint.model_args_from(2, **TUBE_ARGS), NAMES, TUBE_PREP,
                                    raw_class_ids=[0, 1])
    path = tmp_path_factory.mktemp("tube_ckpt") / "tube.pth"
    checkpoint.save_checkpoint(ck, path)
    return path


def _moving_square(n, w=64, h=48):
    frames = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        frames[i, 10:26, i % (w - 16):i % (w - 16) + 16] = 230
    return frames


def _run(tmp_path, inputs, ckpt, *extra):
    out = tmp_path / "out" / "predictions.csv"
    rc = test_cli.cli(["--input_dir", str(inputs), "--output_file", str(out), "--model_path", str(ckpt),
                       "--workers", "0", *extra])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out.with_name("predictions_frames.csv"), newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        frame_rows = list(csv.DictReader(f))
    return rc, out, rows, header, frame_rows


def test_overlapping_windows_score_each_frame_once_from_the_window_it_is_most_central_in():
    """Two windows of 8 frames, the second starting at frame 4 (centres 3.5 and 7.5): frames 0-5 come from the first
    (frame 5.5 is the tie, to the first), 6-11 from the second; a frame never gets both windows' detections. Each
    query is a detection of every class, scored by that class's probability."""
    box = [0.1, 0.1, 0.5, 0.5]
    first, second = _query_pred([[[0.2, 0.1]] * 4], [[box] * 4]), _query_pred([[[0.7, 0.1]] * 4], [[box] * 4])
    res = detections.VideoResult(0, "v.mp4", "v.mp4", None, [], [first, second], 0.7,
                                 frame_indices=[np.array([0, 2, 4, 6]), np.array([4, 6, 8, 10])],
                                 frame_spans=[(0, 8), (4, 12)], tube_mode=True)

    class Scorer:
        def __init__(self):
            self.frames = {}

        def add_frame_detections(self, video, label, frames, scores, boxes, width, height):
            for f, s in zip(frames.tolist(), scores.tolist()):
                self.frames.setdefault(f, []).append((label, round(s, 3)))

        def add_tube(self, *args):
            pass
    scorer = Scorer()
    scoring.add_tube_predictions(scorer, res, 100, 50, threshold=0.5)
    assert scorer.frames == {f: [(0, 0.2), (1, 0.1)] if f <= 5 else [(0, 0.7), (1, 0.1)] for f in range(12)}


def test_a_tube_checkpoint_cuts_its_own_windows_half_overlapping():
    def trained(window_sec, tube_steps=0):
        desc = ModelDescription.from_info({**TUBE_PREP, "class_names": ["a"], "source": "project",
                                           "window_sec": window_sec, "model_args": {"tube_steps": tube_steps}})
        cut = choose_cut(desc)
        return cut.window_sec, cut.stride_sec
    assert trained(None) == (None, None)
    assert trained(1.28) == (1.28, 1.28)
    assert trained(1.28, tube_steps=8) == (1.28, 0.64)


def test_frames_csv_of_a_tube_checkpoint_whole_video(tmp_path, tube_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "a.mp4", _moving_square(12), fps=6)
    rc, out, rows, header, frame_rows = _run(tmp_path, inputs, tube_checkpoint)
    assert rc == 0 and header == FRAME_FIELDS
    # the 4 queries say the same box and class: one actor, one tube at every frame
    assert [(r["pred_class"], r["start_sec"], r["end_sec"]) for r in rows] == [("collapse", "0.000", "2.000")]
    assert [(int(r["tube_id"]), int(r["frame"])) for r in frame_rows] == [(1, f) for f in range(12)]
    assert frame_rows[7]["time_sec"] == "1.167" and frame_rows[7]["video_name"] == "a.mp4"
    for r in frame_rows:
        assert [float(r[k]) for k in ("x1", "y1", "x2", "y2")] == pytest.approx(FIXED_BOX, abs=5e-3)
        assert float(r["score"]) > 0.99
    log = next(out.parent.glob("test_log_*.txt")).read_text()
    assert "predictions_frames.csv (12 rows, tube mode)" in log
    annotated = out.parent / "annotated_videos" / "a.mp4"
    with av.open(str(annotated)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 12
    x1 = int(0.3 * 63)        # the box's left edge, drawn on every frame (rows 27-31: below the moving square)
    for k in (0, 6, 11):
        assert np.abs(decoded[k][27:32, x1 - 1:x1 + 2].astype(int) - 40).max() > 60, k
        assert np.abs(decoded[k][27:32, x1 + 4:x1 + 8].astype(int) - 40).max() < 30, k   # inside: untouched


def test_frames_csv_of_a_tube_checkpoint_windows_joined(tmp_path, tube_checkpoint):
    """40 frames at 10 fps in windows of 2 s every 1 s: the 4 queries (one box, one class) are one actor in each
    window, and its tubes of the 3 windows join into one."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "long.mp4", _moving_square(40), fps=10)
    rc, out, rows, header, frame_rows = _run(tmp_path, inputs, tube_checkpoint, "--window_sec", "2",
                                             "--stride_sec", "1", "--no_annotate")
    assert rc == 0 and header == FRAME_FIELDS
    assert len(rows) == 1 and {(r["start_sec"], r["end_sec"]) for r in rows} == {("0.000", "4.000")}
    assert [(int(r["tube_id"]), int(r["frame"])) for r in frame_rows] == [(1, f) for f in range(40)]


def test_frames_csv_of_a_clip_checkpoint_has_constant_boxes(tmp_path):
    """A clip-mode checkpoint: predictions.csv as before, each of its rows a tube with one box over its span."""
    torch.manual_seed(0)
    net = star_model.STAR(2, num_queries=3, dim_feedforward=64, num_decoder_layers=1).eval()
    with torch.no_grad():
        net.head.class_head[3].bias.zero_()
        net.head.class_head[3].bias[0] = 20.0
    args = checkpoint.model_args_from(2, num_queries=3, dim_feedforward=64, num_decoder_layers=1)
    prep = {**TUBE_PREP, "num_frames": 4}
    path = tmp_path / "clip.pth"
    checkpoint.save_checkpoint(checkpoint.make_checkpoint(net, args, NAMES, prep), path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_video(inputs / "a.mp4", _moving_square(10), fps=5)
    rc, _, rows, header, frame_rows = _run(tmp_path, inputs, path, "--no_annotate")
    assert rc == 0 and header == FRAME_FIELDS and len(rows) == 3 and len(frame_rows) == 3 * 10
    for tube_id, row in enumerate(rows, 1):   # rows in tube_id order; each tube's box is its row's at every frame
        mine = [r for r in frame_rows if int(r["tube_id"]) == tube_id]
        assert [int(r["frame"]) for r in mine] == list(range(10))
        assert {tuple(r[k] for k in ("x1", "y1", "x2", "y2", "score")) for r in mine} == {
            tuple(row[k] for k in ("x1", "y1", "x2", "y2", "score"))}
