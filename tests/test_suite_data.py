"""tools/make_suite_data.py, tools/suite_scenes.py and tools/people.py: the dataset suite's table, every
knob's effect on plans, labels and written videos, tight boxes, the camera, determinism, the dataset loader
on the labels, footage backgrounds and the command line. Videos are tiny (96x72 to 128x96, under a second)."""
import dataclasses
import json

import numpy as np
import pytest

import video
from conftest import MEDIA_DIR
from records import load_dataset
from synthetic_data import make_sample_dataset
from tools import make_suite_data as suite
from tools import people, suite_scenes as scenes

TINY = dict(resolutions=((96, 72),), video_sec=(0.6, 0.6), action_sec=(0.5, 0.5), negative_fraction=0.0,
            num_videos=2, num_unseen=1)


def tiny(**knobs) -> suite.SuiteVariant:
    return dataclasses.replace(suite.SuiteVariant(**TINY), **knobs).validate()


def _rendered(plan, background="flat", media_dir=MEDIA_DIR):
    """Frames (n, H, W, 3) and per-frame label lines of a plan, rendered in memory."""
    frames, lines = zip(*((f.copy(), found) for f, found in scenes.render(plan, background, media_dir)))
    return np.stack(frames), list(lines)


def _labels(root) -> dict[str, list[list[int]]]:
    """{label file: [[frame, track, class, x1, y1, x2, y2], ...]} of a written set."""
    return {p.name: [[int(v) for v in ln.split()] for ln in p.read_text().splitlines() if not ln.startswith("#")]
            for p in sorted(root.glob("video_*.txt"))}


# ---------------------------------------------------------------- the suite's table


def test_suite_table_spans_the_issue_knobs_and_holds_two_out():
    s = suite.SUITE
    assert len(s) >= 8 and sum(v.held_out for v in s.values()) == 2
    for v in s.values():
        v.validate()
    people_variants = [v for v in s.values() if v.renderer == "people"]
    assert {v.renderer for v in s.values()} == {"people", "ellipses"}
    assert min(v.actor_scale[0] for v in people_variants) <= 0.1 and max(v.actor_scale[1] for v in s.values()) >= 0.5
    assert min(v.video_sec[0] for v in s.values()) <= 2 and max(v.video_sec[1] for v in s.values()) >= 30
    assert min(v.action_sec[0] for v in s.values()) <= 0.5 and max(v.action_sec[1] for v in s.values()) >= 6
    assert min(v.tempo[0] for v in s.values()) <= 0.5 and max(v.tempo[1] for v in s.values()) >= 2
    assert min(f for v in s.values() for f in v.fps) <= 15 and max(f for v in s.values() for f in v.fps) >= 60
    assert any(w < h for v in s.values() for w, h in v.resolutions)                          # portrait
    assert any(0 in v.actors and 3 in v.actors and v.occlusion for v in s.values())          # 0-3, crossing
    assert any(v.pan > 0 and v.zoom[1] > 1 for v in s.values())
    assert {v.background for v in people_variants} == set(suite.BACKGROUNDS)
    assert any(v.crf[0] >= 35 and "mjpeg" in v.codecs and v.mjpeg_q[0] >= 15 for v in s.values())
    assert len({suite.split_seed(0, n, split) for n in s for split in ("train", "unseen")}) == 2 * len(s)


# ---------------------------------------------------------------- people and their actions


def _trajectory(acts, t_end=2.0, fps=25, facing=1):
    """Joints over time: {name: (n, 2)} in body units, walking included."""
    out: dict[str, list] = {}
    for t in np.arange(0, t_end, 1 / fps):
        pose, _ = people.pose_at(acts, t, (3.0, 0.5))
        for k, p in people.skeleton(people.Body(), pose, facing).items():
            out.setdefault(k, []).append(p + [facing * people.walked(acts, t), 0])
    return {k: np.array(v) for k, v in out.items()}


def _travel(points) -> float:
    return float(np.ptp(points, axis=0).max())


def test_actions_are_limb_motions_and_idle_still_sways():
    idle = _trajectory([])
    assert 0.005 < _travel(idle["hand0"]) < 0.08 and 0.005 < _travel(idle["head"]) < 0.08
    top = idle["head"][:, 1] - people.Body().head_r
    assert abs(idle["foot0"][:, 1].max()) < 1e-9 and abs(top.min() + 1) < 0.02                    # grounded, 1 tall
    wave = _trajectory([people.Act("wave", 0.2, 1.8, side=0)])
    assert _travel(wave["hand0"]) > 0.5 and wave["hand0"][:, 1].min() < -1.0                      # up above the head
    assert _travel(wave["hand1"]) < 0.08 and _travel(wave["hip"]) < 0.05 and _travel(wave["foot0"]) < 0.05
    jump = _trajectory([people.Act("jump", 0.2, 1.8)])
    assert jump["foot0"][:, 1].min() < -0.2 and jump["hip"][:, 1].max() > idle["hip"][:, 1].max() + 0.05  # air, crouch
    fall = _trajectory([people.Act("fall", 0.2, 1.8)])
    low = np.stack([p[20] for p in fall.values()])       # 0.8 s in: on the ground
    assert np.ptp(low[:, 1]) < 0.35 and np.ptp(low[:, 0]) > 0.8
    assert abs(fall["head"][-1, 1] - idle["head"][-1, 1]) < 0.05                                   # up again
    walk = _trajectory([people.Act("walk", 0.2, 1.8)], facing=-1)
    steps = np.diff([people.walked([people.Act("walk", 0.2, 1.8, 1.2)], t) for t in np.arange(0, 2, 0.01)])
    assert steps.min() >= 0 and steps.max() <= people.WALK_SPEED * 1.2 * 0.01 + 1e-9             # smooth, no leap
    assert people.walked([people.Act("walk", 0.2, 1.8, 1.2)], 5) == pytest.approx(people.WALK_SPEED * 1.2 * 1.3)
    assert walk["hip"][-1, 0] - walk["hip"][0, 0] < -0.8 and _travel(walk["foot0"] - walk["hip"]) > 0.3
    kick = _trajectory([people.Act("kick", 0.2, 1.8, side=1)])
    assert -kick["foot1"][:, 1].min() > 0.35 and -kick["foot0"][:, 1].min() < 0.05 and _travel(kick["hip"]) < 0.1
    with pytest.raises(ValueError, match="unknown action"):
        _trajectory([people.Act("dance", 0.0, 1.0)])


def test_tempo_and_action_length_knobs_shape_the_plans():
    v = tiny(video_sec=(12.0, 12.0), action_sec=(2.0, 3.0), tempo=(1.5, 2.0), actions_per_actor=(3, 3), actors=(2,))
    plans = scenes.plan_dataset(v, 4, seed=1)
    acts = [a for p in plans for actor in p.actors for a, _ in actor.acts]
    assert acts and all(2.0 <= a.end - a.start <= 3.0 and 1.5 <= a.tempo <= 2.0 for a in acts)
    for p in plans:
        for actor in p.actors:
            spans = [(a.start, a.end) for a, _ in actor.acts]
            assert len(spans) in (0, 3) and all(0 <= s < e <= 12.0 for s, e in spans)
            assert all(b[0] - a[1] >= scenes.SPAN_GAP_SEC - 1e-9 for a, b in zip(spans, spans[1:]))
    # a faster tempo: more cycles in the same time (wave: the forearm swings more often)
    swings = [np.sign(np.diff([people.pose_at([people.Act("wave", 0, 2, tempo)], t, (3, 0))[0].arms[0][1]
                               for t in np.arange(0.4, 1.6, 0.01)])) for tempo in (0.6, 2.0)]
    assert (np.diff(swings[1]) != 0).sum() > 2 * (np.diff(swings[0]) != 0).sum()


# ---------------------------------------------------------------- labels: boxes, scale, actors, camera


def test_boxes_are_tight_around_the_figure_on_a_flat_background():
    v = tiny(resolutions=((128, 96),), actors=(1,), background="flat", line_fraction=0.5, actor_scale=(0.3, 0.6))
    checked = 0
    for plan in scenes.plan_dataset(v, 5, seed=2):
        frames, lines = _rendered(plan)
        empty, _ = _rendered(dataclasses.replace(plan, actors=[]))
        assert sum(map(bool, lines)) >= 0.8 * plan.num_frames        # acting 0.5 s of 0.6 s
        for t in [t for t in range(plan.num_frames) if lines[t]][::3]:
            ys, xs = np.nonzero(np.abs(frames[t].astype(int) - empty[t]).max(axis=-1) > 0)
            assert len(lines[t]) == 1
            (track, cls, (x1, y1, x2, y2)), = lines[t]
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 96 and track == 1
            assert plan.actors[0].acts[0][1] == cls
            ink = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.abs(np.subtract((x1, y1, x2, y2), ink)).max() <= 1, (plan.index, t, (x1, y1, x2, y2), ink)
            checked += 1
    assert checked >= 10


def test_boxes_are_clipped_to_the_frame_and_slivers_dropped():
    style = people.Style(True, 0.06, (200, 160, 120), (250, 40, 40), (40, 40, 250))
    joints = people.skeleton(people.Body(), people.idle_pose(0.0, (3.0, 0.0)), 1)
    for x, expect in ((40, "whole"), (0, "clipped"), (-2, "clipped"), (-6, "sliver"), (-9, "gone")):
        pts = {k: np.array([x, 60.0]) + 50 * p for k, p in joints.items()}     # 50 px tall, about 14 px wide
        box = people.figure_box(pts, 50 * people.Body().head_r, 3, style, 96, 72, min_visible=0.3)
        full = people.figure_box(pts, 50 * people.Body().head_r, 3, style, 96, 72)
        if expect in ("sliver", "gone"):
            assert box is None and (full is None) == (expect == "gone")     # a sliver in view: no line
        else:
            assert box == full and 0 <= box[0] < box[2] <= 96 and 0 <= box[1] < box[3] <= 72
            assert (box[0] == 0) == (expect == "clipped") and 50 <= box[3] - box[1] <= 55   # in view vertically


def test_actor_height_follows_the_scale_knob():
    medians = []
    for scale in ((0.10, 0.12), (0.40, 0.45)):
        v = tiny(resolutions=((128, 96),), actors=(1, 2), actor_scale=scale, classes=("walk", "kick"))
        plans = scenes.plan_dataset(v, 3, seed=4)
        assert all(scale[0] <= a.height / p.height <= scale[1] for p in plans for a in p.actors)
        ratios = [(y2 - y1) / p.height for p in plans for found in _rendered(p)[1] for _, _, (_, y1, _, y2) in found]
        assert len(ratios) >= 10 and scale[0] * 0.8 <= np.median(ratios) <= scale[1] * 1.15
        medians.append(np.median(ratios))
    assert medians[1] > 3 * medians[0]


def test_zero_to_three_actors_cross_and_hide_each_other():
    v = tiny(resolutions=((128, 96),), actors=(0, 1, 2, 3), occlusion=True, negative_fraction=0.25)
    plans = scenes.plan_dataset(v, 16, seed=5)
    assert {len(p.actors) for p in plans} == {0, 1, 2, 3}
    assert all([a.ground for a in p.actors] == sorted(a.ground for a in p.actors) for p in plans)   # far to near
    overlapping = 0
    for p in [p for p in plans if len(p.actors) == 3][:2]:
        _, lines = _rendered(p)
        ids = {track for found in lines for track, _, _ in found}
        assert ids <= {1, 2, 3}
        for found in lines:
            boxes = [b for _, _, b in found]
            overlapping += any(max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                               > 0.3 * min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                               for i, a in enumerate(boxes) for b in boxes[i + 1:])   # a third of one hidden
    assert overlapping >= 3


def test_pan_shifts_and_zoom_scales_the_boxes():
    base = tiny(resolutions=((128, 96),), actors=(1,), background="noise", action_sec=(1.0, 1.0), video_sec=(1.0, 1.0),
                actor_scale=(0.15, 0.25))
    still = scenes.plan_dataset(base, 3, seed=6)
    panned = scenes.plan_dataset(dataclasses.replace(base, pan=0.3), 3, seed=6)
    zoomed = scenes.plan_dataset(dataclasses.replace(base, zoom=(1.25, 1.25)), 3, seed=6)
    shifts, zooms = [], 0
    for a, b, c in zip(still, panned, zoomed):
        assert a.actors == b.actors == c.actors and abs(b.camera[0]) == pytest.approx(0.3 * 128)
        la, lb, lc = _rendered(a)[1], _rendered(b)[1], _rendered(c)[1]
        for t in range(a.num_frames):
            if not (la[t] and lb[t]):
                continue
            (_, _, ba), (_, _, bb) = la[t][0], lb[t][0]
            dx = b.camera_at(t)[1] - 64
            if 0 < ba[0] and ba[2] < 128 and 0 < bb[0] and bb[2] < 128:    # not cut by the frame's edges
                assert (bb[0] + bb[2]) / 2 - (ba[0] + ba[2]) / 2 == pytest.approx(-dx, abs=1.5)
                shifts.append(abs(dx))
            bc = lc[t][0][2] if lc[t] else (0, 0, 0, 0)
            if all(0 < b[0] and 0 < b[1] and b[2] < 128 and b[3] < 96 for b in (ba, bc)):   # zoom about the centre
                assert (bc[3] - bc[1]) / (ba[3] - ba[1]) == pytest.approx(1.25, rel=0.1)
                assert (bc[0] + bc[2]) / 2 - 64 == pytest.approx(1.25 * ((ba[0] + ba[2]) / 2 - 64), abs=1.5)
                zooms += 1
    assert max(shifts) > 20 and zooms > 20


# ---------------------------------------------------------------- written sets


@pytest.mark.parametrize("codec, fps, size", [("h264", 15.0, (72, 128)), ("mjpeg", 60.0, (96, 72))])
def test_written_videos_have_the_knobs_rate_size_and_length(tmp_path, codec, fps, size):
    v = tiny(codecs=(codec,), fps=(fps,), resolutions=(size,), video_sec=(0.5, 0.5), mjpeg_q=(20, 20))
    stats = suite.write_people(v, tmp_path, 2, seed=7)
    rows = (tmp_path / "action_challenge.csv").read_text().splitlines()
    assert rows[0] == "video_file,label_file" and len(rows) == 3 and stats["videos"] == 2
    for row in rows[1:]:
        name = row.split(",")[0]
        assert name.endswith(".mp4" if codec == "h264" else ".avi")
        info = video.probe_video(tmp_path / name)
        assert (info.width, info.height, info.fps, info.num_frames) == (*size, fps, round(0.5 * fps))
    assert (tmp_path / "classes.txt").read_text().split() == list(people.ACTIONS)


def test_compression_knobs_shrink_files_and_leave_labels_alone(tmp_path):
    sizes = {}
    for name, knobs in {"h264_good": dict(crf=(18, 18)), "h264_bad": dict(crf=(45, 45)),
                        "mjpeg_good": dict(codecs=("mjpeg",), mjpeg_q=(2, 2)),
                        "mjpeg_bad": dict(codecs=("mjpeg",), mjpeg_q=(28, 28))}.items():
        suite.write_people(tiny(**knobs), tmp_path / name, 1, seed=8)
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name).glob("video_000.*") if f.suffix != ".txt")
        assert _labels(tmp_path / name) == _labels(tmp_path / "h264_good")
    assert sizes["h264_bad"] < sizes["h264_good"] / 2 and sizes["mjpeg_bad"] < sizes["mjpeg_good"] / 2


def test_same_seed_same_files_other_seed_other_labels(tmp_path):
    v = tiny(actors=(1, 2), codecs=("h264", "mjpeg", "folder"))
    for name, seed in (("a", 9), ("b", 9), ("c", 10)):
        suite.make_variant("people_base", v, tmp_path / name, seed=seed, num_videos=3, num_unseen=1)
    a, b, c = (tmp_path / n / "people_base" for n in "abc")
    for split in ("train", "unseen"):
        assert _labels(a / split) and _labels(a / split) == _labels(b / split)
        assert (a / split / "action_challenge.csv").read_text() == (b / split / "action_challenge.csv").read_text()
    assert _labels(a / "train") != _labels(c / "train") and _labels(a / "train") != _labels(a / "unseen")
    assert (a / "train" / "video_000.mp4").read_bytes() == (b / "train" / "video_000.mp4").read_bytes()
    assert (a / "train" / "video_002").is_dir()                     # a folder of numbered JPEG frames
    assert json.loads((a / "variant.json").read_text())["sets"]["train"]["seed"] == suite.split_seed(9, "people_base",
                                                                                                       "train")


def test_labels_load_with_the_dataset_loader_without_problems(tmp_path):
    v = tiny(actors=(1, 2, 3), negative_fraction=1 / 6, occlusion=True, resolutions=((128, 96),), pan=0.2,
             zoom=(1.0, 1.3), video_sec=(1.2, 1.2), action_sec=(1.0, 1.0))
    suite.write_people(v, tmp_path, 6, seed=11)
    records, class_map, problems = load_dataset(tmp_path)
    assert problems == [] and len(records) == 6 and class_map.names == list(people.ACTIONS)
    labels = _labels(tmp_path)
    assert sum(r.has_action for r in records) == len(labels) == 5
    for r in records:
        assert r.per_frame and (r.width, r.height, r.fps) == (128, 96, 25.0)
        lines = labels.get(r.video.replace(".mp4", ".txt"), [])
        assert sorted(t.track_id for t in r.tracks) == sorted({ln[1] for ln in lines})
        assert sum(len(t.frames) for t in r.tracks) == len({(ln[0], ln[1]) for ln in lines})
        for t in r.tracks:   # smooth: a box moves well under a quarter of its diagonal from frame to frame
            consecutive, size = np.diff(t.frames) == 1, np.array([128, 96])
            moves = np.hypot(*np.diff((t.boxes[:, :2] + t.boxes[:, 2:]) / 2 * size, axis=0).T)[consecutive]
            diagonals = np.hypot(*((t.boxes[:-1, 2:] - t.boxes[:-1, :2]) * size).T)[consecutive]
            assert consecutive.any() and (moves < 0.25 * diagonals).all(), (r.video, t.track_id)


def test_ellipses_variant_is_make_sample_data_with_its_knobs(tmp_path):
    v = tiny(renderer="ellipses", classes=("jump", "wave"), actors=(1, 2), video_sec=(1.0, 1.0))
    stats = suite.write_ellipses(v, tmp_path / "suite", 3, seed=12)
    make_sample_dataset(tmp_path / "sample", 3, 25, 96, 72, 25.0, 12, classes=["jump", "wave"], negative_fraction=0.0,
                        two_actor_fraction=0.5, per_frame=True)
    assert _labels(tmp_path / "suite") == _labels(tmp_path / "sample") and stats["videos"] == 3 and stats["tracks"] >= 3


# ---------------------------------------------------------------- backgrounds


def test_flat_and_noise_backgrounds():
    for background, changing in (("flat", False), ("noise", True)):
        plan = scenes.plan_dataset(tiny(actors=(0,), negative_fraction=1.0), 1, seed=13)[0]
        frames, lines = _rendered(plan, background)
        assert not any(lines) and (np.ptp(frames[0].reshape(-1, 3), axis=0).max() > 0) == changing
        assert (np.abs(frames[0].astype(int) - frames[1]).max() > 0) == changing


def test_footage_background_and_its_absence(tmp_path, capsys):
    v = tiny(background="footage", actors=(1,), video_sec=(0.4, 0.4))
    with pytest.raises(scenes.FootageMissing, match="no footage"):
        suite.write_people(v, tmp_path / "x", 1, seed=14, media_dir=tmp_path / "nowhere")
    assert suite.main(["--output_dir", str(tmp_path / "s"), "--variants", "real_background", "--media_dir",
                       str(tmp_path / "nowhere"), "--num_videos", "1", "--num_unseen", "0"]) == 1
    assert "real_background: skipped, no footage" in capsys.readouterr().out
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"no real footage in {MEDIA_DIR}")
    plan = scenes.plan_dataset(v, 1, seed=14)[0]
    frames, lines = _rendered(plan, "footage")
    flat_frames, flat_lines = _rendered(plan, "flat")
    assert lines == flat_lines and any(lines)                             # the background leaves the labels alone
    assert np.ptp(frames[0].reshape(-1, 3), axis=0).max() > 60 and np.abs(frames.astype(int) - flat_frames).mean() > 10


# ---------------------------------------------------------------- the command


def test_command_writes_train_and_unseen_per_variant(tmp_path, capsys):
    out = tmp_path / "suite"
    assert suite.main(["--output_dir", str(out), "--variants", "people_base,ellipses", "--num_videos", "2",
                       "--num_unseen", "1", "--seed", "3", "--resolutions", "96x72", "--video_sec", "0.6", "0.6"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "/train:" in ln or "/unseen:" in ln]
    assert [ln.split(":")[0] for ln in printed] == ["people_base/train", "people_base/unseen", "ellipses/train",
                                                    "ellipses/unseen"]
    assert all("videos" in ln and "actor height" in ln and "action" in ln and "frames" in ln for ln in printed)
    for name in ("people_base", "ellipses"):
        for split, count in (("train", 2), ("unseen", 1)):
            rows = (out / name / split / "action_challenge.csv").read_text().splitlines()
            assert len(rows) == count + 1 and (out / name / split / "classes.txt").is_file()
            info = video.probe_video(out / name / split / rows[1].split(",")[0], fps=25)
            assert (info.width, info.height) == (96, 72)
        assert json.loads((out / name / "variant.json").read_text())["resolutions"] == [[96, 72]]
    assert suite.main(["--output_dir", str(out), "--variants", "nope"]) == 2
    assert suite.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in suite.SUITE) and listed.count("(held out)") == 2
