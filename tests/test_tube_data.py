"""Per-frame labels (tubes): parsing, checks, tracks and interpolation, windows, per-step targets,
augmentation on hand-made tubes, frame folders in a dataset, and the per-frame sample data."""
import types

import cv2
import numpy as np
import pytest
import torch

import dataset
import video
from augment import MAX_STRIP, side_by_side
from conftest import frame_number, numbered_frames, write_video
from labels import FrameInstance, Instance, parse_label_lines
from problems import format_problems
from records import MAX_PROBLEMS_PER_KIND, Track, VideoRecord, default_max_gap, load_dataset
from synthetic_data import make_sample_dataset
from targets import (clip_target, track_spans, training_window, validation_window, video_windows, window_length,
                     xyxy_to_cxcywh)
from tools.make_sample_data import main as make_sample_main

FMT = "<frame> <track_id> <class_id>"


def _write(root, rows, labels):
    """rows: [(video_file, label_file)], labels: {name: text}."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in labels.items():
        (root / name).write_text(text)
    (root / "action_challenge.csv").write_text("video_file,label_file\n" + "".join(f"{v},{l}\n" for v, l in rows))


def _frames_folder(folder, frames):
    """Lossless numbered PNG frames 00001.png ... (the UCF101-24 layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start=1):
        cv2.imwrite(str(folder / f"{i:05d}.png"), np.ascontiguousarray(frame[..., ::-1]))
    return folder


def _track(frames, boxes, labels, max_gap=5, track_id=1):
    return Track(track_id, np.array(frames, np.int64), np.array(boxes, np.float32), labels, max_gap)


def _record(tracks, n=200, fps=25.0):
    """A per-frame record that needs no file (for window and target logic)."""
    return VideoRecord("v.mp4", "/nowhere/v.mp4", [0] * len(tracks), np.zeros((len(tracks), 4), np.float32),
                       64, 48, n, fps, tracks)


# ---------------------------------------------------------------- parsing


def test_parse_per_frame_lines_and_files_of_mixed_kinds():
    lines = ["# " + FMT, "0 1 2 10 20 30 40", "3,7,2,1,2,3,4  # commas", "2.0 1 5 0 0 9 9",
             "4 1 2 10 20 30", "-1 1 2 0 0 5 5", "1.5 1 2 0 0 5 5", "1 2 3 4 5"]
    inst, problems, data_lines = parse_label_lines(lines, "t.txt")
    assert [(i.frame, i.track, i.raw_id, i.box, i.line) for i in inst] == [
        (0, 1, 2, (10, 20, 30, 40), 2), (3, 7, 2, (1, 2, 3, 4), 3), (2, 1, 5, (0, 0, 9, 9), 4)]
    assert all(isinstance(i, FrameInstance) for i in inst) and data_lines == 7
    assert [(p.line, p.severity) for p in problems] == [(5, "skipped"), (6, "skipped"), (7, "skipped"), (8, "skipped")]
    assert all("malformed label line" in p.message and FMT in p.message for p in problems[:3])
    assert "frame must be >= 0" in problems[1].message
    assert "mixes 5- and 7-field lines" in problems[3].message
    # the kind of most lines wins: one stray 7-field line in a 5-field file is the problem
    inst, problems, _ = parse_label_lines(["0 1 1 5 5", "1 2 2 6 6", "0 1 0 1 1 5 5"], "s.txt")
    assert len(inst) == 2 and type(inst[0]) is Instance
    assert [(p.line, "mixes" in p.message) for p in problems] == [(3, True)]


# ---------------------------------------------------------------- tracks


def test_track_interpolates_within_max_gap_only():
    track = _track([2, 6, 20], [[0, 0, .2, .2], [.4, .2, .6, .4], [.4, .2, .6, .4]], [(0,), (0, 1), (1,)], max_gap=5)
    present, boxes, labels = track.at([0, 2, 3, 4, 5, 6, 7, 19, 20, 21])
    assert present.tolist() == [False, True, True, True, True, True, False, False, True, False]
    assert np.allclose(boxes[2], [.1, .05, .3, .25]) and np.allclose(boxes[3], [.2, .1, .4, .3])  # 1/4, 2/4 of the way
    assert labels == [(), (0,), (0,), (0,), (0, 1), (0, 1), (), (), (1,), ()]   # the nearer annotated frame's
    assert not boxes[~present].any()
    assert track.segments() == [(2, 6), (20, 20)]
    frames, dense_boxes, dense_labels = track.dense()
    assert frames.tolist() == [2, 3, 4, 5, 6, 20] and dense_boxes.shape == (6, 4) and len(dense_labels) == 6


def _per_frame_dataset(tmp_path, label_text, n=40, fps=25, **load):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    write_video(root / "a.mp4", numbered_frames(n, 64, 48), fps=fps)
    _write(root, [("a.mp4", "a.txt")], {"a.txt": label_text})
    return load_dataset(root, **load)


def test_every_bad_per_frame_line_is_named_and_skipped(tmp_path):
    text = "\n".join([
        "# " + FMT + " <x1> <y1> <x2> <y2>",
        "0 1 0 10 10 20 20",        # 2  track 1 starts
        "2 1 0 12 10 22 20",        # 3
        "2 1 1 12 10 22 20",        # 4  a second action, same box
        "2 1 1 12 10 22 20",        # 5  repeated line
        "2 1 0 30 30 40 40",        # 6  another box for track 1 at frame 2
        "3 1 0 60 40 63 47",        # 7  jump: moves ~50 px in one frame
        "4 1 0 16 10 26 20",        # 8  back on track
        "40 1 0 10 10 20 20",       # 9  beyond the 40 frames
        "5 2 0 24 24 14 14",        # 10 swapped corners: warning, used
        "6 2 0 -300 -300 20 20",    # 11 mostly outside the frame: warning, used clipped
        "7 2 0 70 10 90 20",        # 12 empty after clipping
        "8 2 0 1 2 3",              # 13 malformed
        "0 10 10 20 20",            # 14 a 5-field line in a 7-field file
    ]) + "\n"
    records, cmap, problems = _per_frame_dataset(tmp_path, text)
    found = {p.line: (p.severity, p.message) for p in problems}
    expect = {5: ("skipped", "repeats line 4"), 6: ("skipped", "already has another box at frame 2 (line 3)"),
              7: ("skipped", "track 1 jumps at frame 3 from frame 2 (line 3)"),
              9: ("skipped", "frame 40 is beyond the video's 40 frames"),
              10: ("warning", "swapped corners"), 11: ("warning", "outside the 64x48 frame"),
              12: ("skipped", "empty box"), 13: ("skipped", "malformed label line"),
              14: ("skipped", "mixes 5- and 7-field lines")}
    assert set(found) == set(expect), found
    for line, (severity, text) in expect.items():
        assert found[line][0] == severity and text in found[line][1], (line, found[line])
    assert all(p.file == "a.txt" and "\n" not in p.message for p in problems)
    table = format_problems(problems)
    assert "7 skipped, 2 warning(s)" in table and all(f"a.txt  {ln:>4}" in table for ln in expect)
    (record,) = records
    assert record.per_frame and cmap.raw_ids == [0, 1]
    one, two = record.tracks
    assert one.frames.tolist() == [0, 2, 4] and one.labels == [(0,), (0, 1), (0,)]   # the jump's line is out
    assert np.allclose(one.boxes[1], [12 / 64, 10 / 48, 22 / 64, 20 / 48])
    assert two.frames.tolist() == [5, 6] and np.allclose(two.boxes, [[14 / 64, 14 / 48, 24 / 64, 24 / 48],
                                                                     [0, 0, 20 / 64, 20 / 48]])
    assert record.labels == [0, 1, 0]    # per (track, class): summary boxes enclose the track's boxes
    assert np.allclose(record.boxes[0], [10 / 64, 10 / 48, 26 / 64, 20 / 48])


def test_max_gap_defaults_to_one_second_of_the_video(tmp_path):
    text = "0 1 0 0 0 10 10\n10 1 0 10 0 20 10\n21 1 0 20 0 30 10\n"
    (record,), _, problems = _per_frame_dataset(tmp_path, text, fps=10)
    assert not problems and record.tracks[0].max_gap == 10
    assert record.tracks[0].segments() == [(0, 10), (21, 21)]         # 10 frames apart: joined; 11: not
    (record,), _, _ = _per_frame_dataset(tmp_path, text, fps=10, max_gap=11)
    assert record.tracks[0].segments() == [(0, 21)]
    assert default_max_gap(29.97) == 30 and default_max_gap(25.0) == 25


def test_problems_of_one_kind_are_capped_per_file(tmp_path):
    text = "0 1 0 0 0 10 10\n" + "".join(f"{50 + k} 1 0 0 0 10 10\n" for k in range(25))
    _, _, problems = _per_frame_dataset(tmp_path, text)
    assert len(problems) == MAX_PROBLEMS_PER_KIND + 1
    assert [p.line for p in problems[:-1]] == list(range(2, 12))
    assert "15 more line(s) like the above (beyond, lines 12 to 26); skipped" in problems[-1].message


def test_a_per_frame_dataset_with_frame_folders_and_negatives(tmp_path):
    root = tmp_path / "data"
    _frames_folder(root / "frames" / "v1", numbered_frames(30))
    write_video(root / "neg.mp4", numbered_frames(20))
    write_video(root / "old.mp4", numbered_frames(20))
    _write(root, [("frames/v1", "v1.txt"), ("neg.mp4", ""), ("old.mp4", "old.txt"), ("frames/none", "")],
           {"v1.txt": "3 0 1 0 0 10 10\n", "old.txt": "1 0 0 10 10\n"})
    records, cmap, problems = load_dataset(root, fps=10)
    v1, neg, old = records
    assert (v1.num_frames, v1.fps, v1.tracks[0].max_gap) == (30, 10.0, 10) and v1.per_frame
    assert neg.tracks == [] and neg.per_frame and not neg.has_action   # windowed like the per-frame videos
    assert old.tracks is None and not old.per_frame                     # 5-field: the seed's path
    assert [(p.file, p.line) for p in problems] == [("frames/none", None)] and "missing video" in problems[0].message


# ---------------------------------------------------------------- windows


def test_training_windows_hold_a_track_or_avoid_every_track():
    tracks = [_track([40, 60], [[0, 0, .2, .2]] * 2, [(0,), (0,)], max_gap=30),
              _track([150, 155], [[0, 0, .2, .2]] * 2, [(1,), (1,)], max_gap=30, track_id=2)]
    record = _record(tracks, n=200)
    assert track_spans(record) == [(40, 60), (150, 155)]
    starts = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        s, e = training_window(record, 32, rng, negative_prob=0.0)
        assert e - s == 32 and 0 <= s <= 168 and any(a <= e - 1 and b >= s for a, b in [(40, 60), (150, 155)])
        starts.add(s)
        s, e = training_window(record, 32, rng, negative_prob=1.0)
        assert all(b < s or a >= e for a, b in [(40, 60), (150, 155)]), (s, e)
    assert len(starts) > 50
    crowded = _record([_track([0, 199], [[0, 0, .2, .2]] * 2, [(0,), (0,)], max_gap=300)], n=200)
    assert training_window(crowded, 32, np.random.default_rng(0), negative_prob=1.0)[1] <= 200
    assert training_window(record, 500, np.random.default_rng(0)) == (0, 200)   # window > video
    assert validation_window(record, 32) == (82, 114)       # centred on the extent 40..155
    assert validation_window(_record([], n=100), 32) == (34, 66)


def test_video_windows_are_the_inference_windows(make_video):
    path = make_video("long.mp4", n=57, fps=10)
    record = VideoRecord("long.mp4", str(path), [], np.zeros((0, 4), np.float32), 64, 48, 57, 10.0, [])
    windows = video_windows(record, 4, window_frames=20, stride_frames=15)
    decoded = list(video.iter_windows(path, 4, window_sec=2.0, stride_sec=1.5))
    assert len(windows) == len(decoded) == 4 and windows[-1][1] == 57
    for (s, e, idx), (frames, start, end) in zip(windows, decoded):
        assert [frame_number(f) for f in frames] == idx.tolist() and (start, end) == pytest.approx((s / 10, e / 10))


# ---------------------------------------------------------------- targets


def test_targets_of_per_video_labels_repeat_at_every_step(make_video, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "a.mp4", numbered_frames(20))
    _write(root, [("a.mp4", "a.txt")], {"a.txt": "3 8 8 40 40\n4 0 0 32 24\n"})
    records = load_dataset(root)[0]
    for augment in (False, True):
        _, t = dataset.ActionDataset(records, 6, 32, augment=augment)[0]
        assert t["track_ids"].tolist() == [0, 1] and t["track_labels"].tolist() == [[0] * 6, [1] * 6]
        assert t["track_boxes"].shape == (2, 6, 4) and t["track_boxes"].dtype == torch.float32
        assert torch.equal(t["track_boxes"], t["boxes"][:, None].expand(2, 6, 4))
        assert t["frame_indices"].dtype == torch.int64 and t["frame_indices"].shape == (6,)
    _, t = dataset.ActionDataset(records, 6, 32, augment=True, still_prob=1.0)[0]
    assert t["track_ids"].shape == (0,) and t["track_labels"].shape == (0, 6) and t["track_boxes"].shape == (0, 6, 4)


def test_validation_targets_follow_the_tube_at_the_decoded_frames(tmp_path):
    """Two actors; one does two actions at once for a while. No augmentation: the window is the
    centred one, and every step's target is the ground truth at exactly the frame decoded."""
    lines = [f"{f} 1 0 {f} 4 {f + 10} 20" for f in range(10, 50, 4)] + ["30 1 2 30 4 40 20"] + \
            [f"{f} 7 2 40 30 50 40" for f in (30, 38)]
    (record,), cmap, problems = _per_frame_dataset(tmp_path, "\n".join(lines) + "\n", n=60)
    assert not problems and cmap.raw_ids == [0, 2]
    ds = dataset.ActionDataset([record], 8, 64, window_frames=24, mean=(0, 0, 0), std=(1, 1, 1))
    clip, t = ds[0]
    idx = t["frame_indices"].numpy()
    start, end = validation_window(record, 24)
    assert abs((start + end) / 2 - (10 + 47) / 2) <= 0.5          # centred on the tracks' extent 10..46
    assert idx.tolist() == (start + video.sample_indices(24, 8)).tolist()
    frames = (clip.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert [frame_number(f) for f in frames] == idx.tolist()
    assert t["track_ids"].tolist() == [1, 1, 7] and t["track_labels"][0].tolist() == [0] * 8
    # class 2 (index 1) only at keyframe 30: frames 29..32 take it (nearer keyframe; the earlier on a tie)
    assert t["track_labels"][1].tolist() == [1 if 29 <= f <= 32 else -1 for f in idx]
    assert t["track_labels"][2].tolist() == [1 if 30 <= f <= 38 else -1 for f in idx]   # track 7: 30..38
    for step, f in enumerate(idx):                # track 1 moves 1 px a frame: x1 = frame
        want = xyxy_to_cxcywh(np.array([[f / 64, 4 / 48, (f + 10) / 64, 20 / 48]], np.float32))[0]
        assert np.allclose(t["track_boxes"][0, step].numpy(), want, atol=1e-6)
    mid = 8 // 2
    assert t["labels"].tolist() == [lab for lab in t["track_labels"][:, mid].tolist() if lab >= 0]
    assert torch.equal(t["boxes"], t["track_boxes"][t["track_labels"][:, mid] >= 0, mid])
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(clip_target(record, idx).values(), t.values()))


def _moving_box(f):
    """The hand-made tube: a 20x16 white box moving 3 px right and 1 px down a frame."""
    return 4 + 3 * f, 8 + f, 24 + 3 * f, 24 + f


def test_augmentation_keeps_every_steps_box_on_the_decoded_frame(tmp_path):
    """Flip, crop/scale and temporal jitter over windows of a moving box labelled every 5th frame
    (interpolated in between): at every step the target is exactly where the box is drawn in the
    augmented frame; an off-by-one frame would be 1.8 px or more away (>= 3 px a frame * 96/160)."""
    n, w, h, S = 40, 160, 96, 96
    frames = np.zeros((n, h, w, 3), np.uint8)
    for f in range(n):
        x1, y1, x2, y2 = _moving_box(f)
        frames[f, y1:y2, x1:x2] = 255
    root = tmp_path / "data"
    _frames_folder(root / "tube", frames)
    lines = "".join(f"{f} 3 0 {' '.join(map(str, _moving_box(f)))}\n" for f in list(range(0, n, 5)) + [n - 1])
    _write(root, [("tube", "tube.txt")], {"tube.txt": lines})
    records, _, problems = load_dataset(root)
    assert not problems
    ds = dataset.ActionDataset(records, 8, S, augment=True, window_frames=24, negative_prob=0.0,
                               mean=(0, 0, 0), std=(1, 1, 1), seed=4)
    flips, windows = 0, set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        clip, t = ds[0]
        idx = t["frame_indices"].numpy()
        windows.add(int(idx[0]))
        assert idx.max() - idx.min() < 24 and (np.diff(idx) > 0).all()
        out = clip.permute(0, 2, 3, 1).numpy().mean(-1)
        for step in range(8):
            assert t["track_labels"][0, step] == 0
            ys, xs = np.nonzero(out[step] > out[step].max() / 2)
            drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            cx, cy, bw, bh = t["track_boxes"][0, step].numpy() * S
            target = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            assert np.abs(drawn - target).max() <= 1.0, (epoch, step, idx[step], drawn, target)
        flips += bool(t["track_boxes"][0, 0, 0] > t["track_boxes"][0, -1, 0])   # moves left when flipped
    assert 2 <= flips <= 10 and len(windows) > 3


def test_training_windows_are_redrawn_every_epoch_and_reproducible(tmp_path):
    lines = "".join(f"{f} 1 0 10 10 30 30\n" for f in range(30, 60, 10))
    records, _, _ = _per_frame_dataset(tmp_path, lines, n=100)
    a = dataset.ActionDataset(records, 4, 16, augment=True, window_frames=20, seed=2)
    b = dataset.ActionDataset(records, 4, 16, augment=True, window_frames=20, seed=2)
    seen = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        ta, tb = a[0][1], b[(0, epoch)][1]
        assert torch.equal(ta["frame_indices"], tb["frame_indices"])
        seen.add(tuple(ta["frame_indices"].tolist()))
    assert len(seen) > 3
    with pytest.raises(ValueError, match="not both"):
        dataset.ActionDataset(records, 4, 16, window_frames=20, window_sec=1.0)
    assert window_length(records[0], window_sec=0.5) == 12   # 0.5 s at 25 fps, as window_spans cuts


def test_clips_per_video_draws_more_windows_of_each_video_and_keeps_the_first(tmp_path):
    lines = "".join(f"{f} 1 0 10 10 30 30\n" for f in range(10, 90, 10))
    records, _, _ = _per_frame_dataset(tmp_path, lines, n=100)
    one = dataset.ActionDataset(records, 4, 16, augment=True, window_frames=20, seed=2)
    two = dataset.ActionDataset(records, 4, 16, augment=True, window_frames=20, seed=2, clips_per_video=2)
    assert len(two) == 2 * len(one) and two.has_action == one.has_action * 2
    windows = set()
    for epoch in range(4):
        first, second = two[(0, epoch)], two[(len(records), epoch)]
        assert torch.equal(first[0], one[(0, epoch)][0])           # copy 0: the sample of one clip per video
        assert second[1]["video"] == first[1]["video"]
        windows.add((tuple(first[1]["frame_indices"].tolist()), tuple(second[1]["frame_indices"].tolist())))
    assert any(a != b for a, b in windows)                         # the second copy draws its own window
    with pytest.raises(ValueError, match="clips_per_video"):
        dataset.ActionDataset(records, 4, 16, clips_per_video=0)


def _bright_boxes(frames):
    """Bounding boxes (pixels xyxy, x2/y2 exclusive) of the bright pixels of each frame's left and right halves."""
    out = []
    for f in frames.mean(-1):
        half = f.shape[1] // 2
        row = []
        for x0, part in ((0, f[:, :half]), (half, f[:, half:])):
            ys, xs = np.nonzero(part > 127)
            row.append(None if not len(xs) else np.array([xs.min() + x0, ys.min(), xs.max() + 1 + x0, ys.max() + 1]))
        out.append(row)
    return out


def test_side_by_side_puts_each_clip_in_a_half_with_its_boxes_where_its_actor_is_drawn():
    """Two clips, each a white box moving over T steps (one absent at step 0): the joined frames show each box in
    its own half, and every target box lies on its drawn box within a pixel (the strips are resized)."""
    S, T = 64, 4
    rng = np.random.default_rng(0)
    clips = []
    for x0, w in ((6, 10), (30, 20)):
        frames = np.zeros((T, S, S, 3), np.uint8)
        boxes = np.zeros((1, T, 4), np.float32)
        acting = np.ones((1, T), bool)
        for t in range(T):
            x1, y1 = x0 + 3 * t, 10 + 2 * t
            frames[t, y1:y1 + 16, x1:x1 + w] = 255
            boxes[0, t] = np.array([x1, y1, x1 + w, y1 + 16]) / S
        clips.append((frames, acting, boxes))
    clips[1][1][0, 0] = False                       # b's actor is drawn at step 0 but does not act there
    clips[1][2][0, 0] = 0.0
    sides = set()
    for _ in range(10):
        joined = side_by_side(clips[0], clips[1], rng)
        assert joined is not None
        frames, acting, boxes = joined
        assert frames.shape == (T, S, S, 3) and acting.tolist() == [[True] * T, [False] + [True] * (T - 1)]
        drawn = _bright_boxes(frames)
        a_side = 0 if boxes[0, 0, 0] < 0.5 else 1
        sides.add(a_side)
        for t in range(T):
            for row, side in ((0, a_side), (1, 1 - a_side)):
                if acting[row, t]:
                    assert np.abs(drawn[t][side] - boxes[row, t] * S).max() <= 1.0, (t, row, drawn[t], boxes[:, t] * S)
                    assert (boxes[row, t, [0, 2]] * S >= side * S // 2 - 1e-4).all()
                    assert (boxes[row, t, [0, 2]] * S <= (side + 1) * S // 2 + 1e-4).all()
        assert not boxes[1, 0].any()                 # not acting: no box
    assert sides == {0, 1}                           # either clip may go left


def test_side_by_side_declines_boxes_wider_than_a_strip():
    S, T = 32, 2
    wide = np.zeros((1, T, 4), np.float32)
    wide[0, :] = [0.0, 0.2, MAX_STRIP + 0.05, 0.6]
    frames = np.zeros((T, S, S, 3), np.uint8)
    empty = (frames, np.zeros((0, T), bool), np.zeros((0, T, 4), np.float32))
    assert side_by_side((frames, np.ones((1, T), bool), wide), empty, np.random.default_rng(0)) is None
    frames_, acting, boxes = side_by_side(empty, empty, np.random.default_rng(0))   # nobody acts: still pairs
    assert frames_.shape == frames.shape and acting.shape == (0, T) and boxes.shape == (0, T, 4)


def test_pair_prob_shows_windows_of_two_videos_in_one_clip(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b"):
        write_video(root / f"{name}.mp4", numbered_frames(60, 64, 48), fps=25)
    _write(root, [("a.mp4", "a.txt"), ("b.mp4", "b.txt")],
           {"a.txt": "".join(f"{f} 1 0 8 8 20 30\n" for f in [*range(0, 60, 5), 59]),
            "b.txt": "".join(f"{f} 1 1 40 10 52 40\n" for f in [*range(0, 60, 5), 59])})
    records, _, problems = load_dataset(root)
    assert not problems
    alone = dataset.ActionDataset(records, 4, 32, augment=True, window_frames=20, seed=3, negative_prob=0.0)
    paired = dataset.ActionDataset(records, 4, 32, augment=True, window_frames=20, seed=3, negative_prob=0.0,
                                   pair_prob=1.0)
    for epoch in range(3):
        clip, t = paired[(0, epoch)]
        own = alone[(0, epoch)][1]
        assert t["video"] == "a.mp4" and torch.equal(t["frame_indices"], own["frame_indices"])
        assert t["track_ids"][0] == 1 and t["track_ids"][1] > 1        # b's track gets an id after a's
        assert t["track_labels"].tolist() == [[0] * 4, [1] * 4]        # a's actor and b's, both acting throughout
        left = t["track_boxes"][:, :, 0] < 0.5                         # box centres: one per half at every step
        assert (left[0] != left[1]).all()
        assert clip.shape == alone[(0, epoch)][0].shape
    with pytest.raises(ValueError, match="pair_prob"):
        dataset.ActionDataset(records, 4, 16, pair_prob=1.5)


def test_a_paired_window_partners_any_other_per_frame_video():
    """Records 1 and 4 have whole-video labels: the partner of record i is any per-frame record but i."""
    records = [types.SimpleNamespace(tracks=None if k in (1, 4) else [], video=f"v{k}") for k in range(6)]
    paired = dataset.ActionDataset(records, 4, 32, pair_prob=1.0)
    asked = []

    def undecodable(record, rng):   # the partner's window: record which, and stop there
        asked.append(record.video)
        raise video.VideoError(f"{record.video}: cannot decode")
    paired._sample = undecodable
    for i in (0, 2, 3, 5):
        asked.clear()
        for seed in range(40):
            assert paired._paired(i, np.random.default_rng(seed), "frames", *"tcab") == ("frames", *"tcab")
        assert set(asked) == {"v0", "v2", "v3", "v5"} - {f"v{i}"}
    alone = dataset.ActionDataset(records[:2], 4, 32, pair_prob=1.0)   # one per-frame record: nobody to pair with
    assert alone._paired(0, np.random.default_rng(0), "frames", *"tcab") == ("frames", *"tcab")


def test_collate_keeps_per_step_targets(tmp_path):
    records, _, _ = _per_frame_dataset(tmp_path, "5 1 0 10 10 30 30\n9 1 0 12 10 32 30\n")
    ds = dataset.ActionDataset(records, 4, 16, window_frames=10)
    clips, targets = dataset.collate([ds[0], ds[0]])
    assert clips.shape == (2, 4, 3, 16, 16) and targets[1]["track_labels"].shape == (1, 4)


# ---------------------------------------------------------------- sample data


def test_per_frame_sample_data(tmp_path):
    kwargs = dict(num_videos=8, num_frames=60, width=96, height=72, seed=2, two_actor_fraction=0.7, per_frame=True)
    summary = make_sample_dataset(tmp_path / "a", **kwargs)
    assert summary["frame_folders"] == 1 and (tmp_path / "a" / "video_005").is_dir()
    records, cmap, problems = load_dataset(tmp_path / "a")
    assert not problems and cmap.names == ["jump", "walk", "wave"] and all(r.per_frame for r in records)
    positives = [r for r in records if r.has_action]
    assert len(positives) == summary["positives"] and summary["two_actor"] >= 1
    for r in positives:
        for track in r.tracks:
            (a, b), = track.segments()                  # acts once, for part of the video
            assert b - a + 1 < 0.8 * r.num_frames and len(track.frames) == b - a + 1
    two = [r for r in positives if len(r.tracks) == 2]
    assert two and all(set(range(*t0.segments()[0])) & set(range(*t1.segments()[0])) for t0, t1 in
                       (r.tracks for r in two))      # two actors act at the same time
    for r in positives[:3]:                           # the actor lies in its box in labelled frames
        track = r.tracks[0]
        frames = video.read_frames(r.path, track.frames[::7])
        for frame, box in zip(frames, track.boxes[::7]):
            sat = frame.max(axis=-1).astype(int) - frame.min(axis=-1)
            ys, xs = np.nonzero((sat > 120) & (frame.max(axis=-1) > 170))
            x1, y1, x2, y2 = box * [r.width, r.height, r.width, r.height]
            inside = (xs >= x1 - 2) & (xs <= x2 + 1) & (ys >= y1 - 2) & (ys <= y2 + 1)   # JPEG/H.264 blur
            assert inside.sum() > 5                       # a waving actor shrinks to ~10 px here
            if len(r.tracks) == 1:
                assert inside.all()
    assert make_sample_main(["--output_dir", str(tmp_path / "b"), "--num_videos", "8", "--num_frames", "60",
                             "--width", "96", "--height", "72", "--seed", "2", "--two_actor_fraction", "0.7",
                             "--per_frame", "--label_step", "5"]) == 0
    sparse, _, problems = load_dataset(tmp_path / "b")
    assert not problems
    for dense_r, sparse_r in zip(records, sparse):    # keyframes every 5th frame, interpolated: the same tubes
        assert [t.segments() for t in dense_r.tracks] == [t.segments() for t in sparse_r.tracks]
        for t in sparse_r.tracks:
            assert len(t.frames) <= (t.segments()[0][1] - t.segments()[0][0]) // 5 + 2
    for r in positives:                               # same seed, same tubes: the keyframes are dense lines
        name = r.video.split(".")[0] + ".txt"
        dense_lines = set((tmp_path / "a" / name).read_text().splitlines())
        assert set((tmp_path / "b" / name).read_text().splitlines()) < dense_lines
