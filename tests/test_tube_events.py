"""Live tubes (tube_events.py, tubes.TubeLinker, stream.py --tube_events/--webhook): incremental joining equals
test.py's batch joining, ids through pauses, start and end events, and the events file of a stream."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import clip_loader
import detections
import inference
import postprocess
import sources
import stream
import stream_state
import tube_events
import tubes
import video
from conftest import ROOT, tube_checkpoint, write_video

NAMES = ["fight", "collapse", "wave"]
FIELDS = list(tube_events.EVENT_FIELDS)
CPU = torch.device("cpu")
FPS = 25.0


# --------------------------------------------------------------------------- a synthetic world of actors


def world(rng, frames: int, actors: int) -> list[dict]:
    """Actors that act in 1-3 spans (classes may change between spans), drifting boxes."""
    out = []
    for _ in range(actors):
        spans, t = [], int(rng.integers(0, frames // 3))
        while t < frames and len(spans) < 3:
            length = int(rng.integers(10, 90))
            spans.append((t, min(frames, t + length), int(rng.integers(len(NAMES)))))
            t += length + int(rng.choice([rng.integers(0, 60), rng.integers(18, 32)]))   # many near the 25-frame gap
        xy = rng.uniform(0.05, 0.5, 2)
        out.append({"spans": spans, "xy": xy, "v": rng.uniform(-0.002, 0.002, 2), "size": rng.uniform(0.2, 0.4)})
    return out


def window_prediction(actors, first: int, win: int, steps: int, rng) -> tuple[dict, np.ndarray]:
    """One window's tube-mode prediction (a query per actor plus one that never acts) and its step frames."""
    indices = first + video.sample_indices(win, steps)
    probs = np.full((len(actors) + 1, steps, len(NAMES)), 0.02)
    boxes = np.zeros((len(actors) + 1, steps, 4))
    for q, a in enumerate(actors):
        xy = a["xy"] + a["v"][None] * indices[:, None] + rng.normal(0, 0.003, (steps, 2))
        boxes[q] = np.concatenate([xy, xy + a["size"]], 1)
        for s, f in enumerate(indices):
            for start, end, c in a["spans"]:
                if start <= f < end:
                    probs[q, s, c] = rng.uniform(0.6, 0.95)
            if "probs" in a:
                probs[q, s] = a["probs"](f)
    boxes[-1] = [0.0, 0.0, 0.1, 0.1]
    pred = postprocess.tube_prediction(torch.tensor(probs, dtype=torch.float32), torch.tensor(probs.sum(1).argmax(-1)),
                                   torch.tensor(boxes, dtype=torch.float32))
    return pred, indices


def clip_tubes_of(actors, frames: int, win: int, stride: int, rng, threshold=0.5):
    """Per window in stream order: (span, clip tubes) as stream.py's predictor makes them."""
    out = []
    for first in range(0, frames - win + 1, stride):
        pred, indices = window_prediction(actors, first, win, 8, rng)
        pred = tubes.merge_duplicate_queries(pred, threshold)
        out.append(((first, first + win), tubes.clip_tubes(pred, indices, (first, first + win), threshold, NAMES)))
    return out


def _same_tubes(a, b):
    assert [(t.tube_id, t.class_id, t.frames.tolist()) for t in a] == [(t.tube_id, t.class_id, t.frames.tolist())
                                                                         for t in b]
    for x, y in zip(a, b):
        assert x.score == y.score and np.array_equal(x.boxes, y.boxes)


def _live(stride: int, fps: float = FPS) -> tube_events.LiveTubes:
    linker = detections.tube_linker(fps)
    start = video.seconds_to_frames(tube_events.START_SEC, fps)
    return tube_events.LiveTubes(linker, tube_events.FrameClock(fps), start, stride)


@pytest.mark.parametrize("win, stride", [(32, 8), (32, 16), (16, 16), (8, 20)])
@pytest.mark.parametrize("seed", range(4))
def test_incremental_linking_equals_batch_joining(seed, win, stride):
    """Window by window with actors retired as soon as no later window can reach them, and through LiveTubes, the
    tubes are those of test.py's batch joining (tubes.join_tubes) on the same clip tubes (windows overlapping,
    end to end, and with gaps between them)."""
    rng = np.random.default_rng(seed)
    frames = 400
    clips = clip_tubes_of(world(rng, frames, int(rng.integers(1, 4))), frames, win, stride, rng)
    rules = detections.tube_linker(FPS)
    batch = tubes.join_tubes([c for _, c in clips], rules.iou_threshold, rules.max_gap, min_frames=rules.min_frames)
    assert batch, "the world makes tubes"
    linker, retired = detections.tube_linker(FPS), 0
    for i, ((first, _), clip) in enumerate(clips):
        retired += len(linker.add(clip, first + stride))
    _same_tubes(linker.finish(), batch)
    assert retired > 0 or len(batch) == 1   # actors left before the end
    live = _live(stride)
    for span, clip in clips:
        live.update(clip, span, time.monotonic())
    live.finish(frames - 1, time.monotonic())
    _same_tubes(live.final, batch)


@pytest.mark.parametrize("win, stride", [(8, 8), (8, 16), (32, 8)])
def test_retiring_is_exact_at_the_gap(win, stride):
    """Pauses around the joining gap (25 frames at 25 fps): bridged or not, the incremental tubes are the batch's."""
    counts = set()
    for end, pause in itertools.product(range(37, 41), range(20, 28)):
        actor = {"spans": [(0, end, 1), (end + pause, 120, 1)], "xy": np.array([0.3, 0.3]), "v": np.zeros(2),
                 "size": 0.3}
        clips = clip_tubes_of([actor], 160, win, stride, np.random.default_rng(pause))
        rules = detections.tube_linker(FPS)
        batch = tubes.join_tubes([c for _, c in clips], rules.iou_threshold, rules.max_gap,
                                 min_frames=rules.min_frames)
        linker = detections.tube_linker(FPS)
        for (first, _), clip in clips:
            linker.add(clip, first + stride)
        _same_tubes(linker.finish(), batch)
        counts.add(len(batch))
    assert counts == {1, 2}


def _events_of(live: tube_events.LiveTubes, clips, frames: int) -> list[tube_events.TubeEvent]:
    events = []
    for span, clip in clips:
        events += live.update(clip, span, time.monotonic())
    return events + live.finish(frames - 1, time.monotonic())


def _one_actor(spans, frames=300, stride=8, seed=0):
    rng = np.random.default_rng(seed)
    actor = {"spans": spans, "xy": np.array([0.3, 0.3]), "v": np.zeros(2), "size": 0.3}
    return clip_tubes_of([actor], frames, 32, stride, rng), frames


@pytest.mark.parametrize("stride", [8, 16])
def test_one_tube_that_starts_and_ends_inside_the_stream(stride):
    clips, frames = _one_actor([(60, 160, 1)], stride=stride)
    events = _events_of(_live(stride), clips, frames)
    assert [(e.event, e.tube_id, e.pred_class) for e in events] == [("start", 1, "collapse"), ("end", 1, "collapse")]
    start, end = events
    assert start.action_end_sec is None and end.action_start_sec == start.action_start_sec
    assert abs(start.action_start_sec - 60 / FPS) <= 4 / FPS and abs(end.action_end_sec - 160 / FPS) <= 4 / FPS
    # said once START_SEC of it were predicted, and ended once the newest window was a joining gap past its end
    assert start.stream_time_sec - start.action_start_sec >= tube_events.START_SEC - 1 / FPS
    assert start.stream_time_sec <= start.action_start_sec + tube_events.START_SEC + stride / FPS
    assert end.action_end_sec + detections.MAX_GAP_SEC < end.stream_time_sec
    assert end.stream_time_sec <= end.action_end_sec + detections.MAX_GAP_SEC + (stride + 1) / FPS
    assert all(0.0 <= v <= 1.0 for v in start.box) and start.latency_sec >= 0


def test_a_tube_still_open_at_the_end_ends_with_the_stream():
    clips, frames = _one_actor([(100, 300, 0)])
    events = _events_of(_live(8), clips, frames)
    assert [e.event for e in events] == ["start", "end"]
    assert events[1].stream_time_sec == pytest.approx((frames - 1) / FPS)
    assert events[1].action_end_sec == pytest.approx((clips[-1][0][1]) / FPS, abs=4 / FPS)


def test_an_id_is_kept_through_a_short_pause_and_a_new_one_after_a_long_one():
    short, frames = _one_actor([(40, 100, 2), (110, 200, 2)])            # 10 frames: under the 1 s gap
    events = _events_of(_live(8), short, frames)
    assert [(e.event, e.tube_id) for e in events] == [("start", 1), ("end", 1)]
    long, frames = _one_actor([(20, 80, 2), (160, 240, 2)])              # 80 frames: over it
    events = _events_of(_live(8), long, frames)
    assert [(e.event, e.tube_id) for e in events] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert events[1].action_end_sec < events[2].action_start_sec


def test_a_change_of_action_ends_the_tube_and_starts_another():
    clips, frames = _one_actor([(20, 120, 0), (120, 240, 1)])
    events = _events_of(_live(8), clips, frames)
    assert [(e.event, e.tube_id, e.pred_class) for e in events] == [
        ("start", 1, "fight"), ("start", 2, "collapse"), ("end", 1, "fight"), ("end", 2, "collapse")]
    assert events[2].stream_time_sec == events[1].stream_time_sec   # the actor does one thing at a time


def test_a_tube_its_actor_no_longer_makes_ends_when_relabelled():
    """One window leans fight (0.5 against 0.4), then every window says collapse: the class vote (tubes.part_classes)
    soon makes the whole actor collapse; the fight tube said at first ends there and a collapse tube starts."""
    actor = {"spans": [(0, 300, 1)], "xy": np.array([0.3, 0.3]), "v": np.zeros(2), "size": 0.3,
             "probs": lambda f: [0.5, 0.4, 0.02] if f < 32 else [0.1, 0.85, 0.02]}
    clips = clip_tubes_of([actor], 300, 32, 32, np.random.default_rng(0))
    events = _events_of(_live(32), clips, 300)
    assert [(e.event, e.tube_id, e.pred_class) for e in events] == [
        ("start", 1, "fight"), ("end", 1, "fight"), ("start", 2, "collapse"), ("end", 2, "collapse")]
    assert events[1].stream_time_sec < (300 - 1) / FPS - 2


def test_too_short_an_action_says_nothing():
    clips, frames = _one_actor([(100, 108, 0)])
    assert _events_of(_live(8), clips, frames) == []


def test_drawn_boxes_are_the_started_tubes_predicted_boxes():
    clips, frames = _one_actor([(60, 160, 1)])
    live = _live(8)
    for span, clip in clips[:12]:   # predicted up to frame 32 + 11 * 8 = 120
        live.update(clip, span, time.monotonic())
    assert live.covered == clips[11][0][1]
    shown = live.boxes_at(100)
    assert len(shown) == 1 and shown[0][0] == "collapse" and shown[0][3] == "#1"
    np.testing.assert_allclose(shown[0][2], [0.3, 0.3, 0.6, 0.6], atol=0.02)
    assert live.boxes_at(30) == [] and live.boxes_at(live.covered + 5) == []   # before it; never ahead


# --------------------------------------------------------------------------- stream.py


@pytest.fixture(scope="module")
def tube_ckpt(tmp_path_factory):
    return tube_checkpoint(tmp_path_factory.mktemp("tube") / "tube.pth")


def _rows(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == FIELDS and all(len(r) == len(FIELDS) for r in rows[1:])
    return [dict(zip(FIELDS, r)) for r in rows[1:]]


def test_stream_tubes_equal_test_py_tubes_on_the_same_windows(tmp_path, tube_ckpt):
    """A file played live with test.py's windows (1.28 s every 0.64 s, 25 fps, 80 frames: the windows end at the
    last frame) gives test.py's tubes, and a start and an end row per tube."""
    src = write_video(tmp_path / "v.mp4", np.random.default_rng(0).integers(0, 255, (80, 48, 64, 3), np.uint8))
    net, desc = inference.load_model(tube_ckpt, CPU)
    results = [detections.VideoResult(0, "v.mp4", str(src))]
    settings = inference.Settings(score_threshold=0.5, window_sec=1.28, stride_sec=0.64, annotate=False, workers=0)
    loader = clip_loader.make_loader(clip_loader.ClipStream([src], 8, desc.img_size, desc.mean, desc.std, 1.28, 0.64),
                                     1, 0)
    inference.predict(net, loader, results, desc.class_names, 0.5, CPU, None,
                      lambda res: detections.finish_video(res, settings))
    assert results[0].tubes
    events = tmp_path / "tubes.csv"
    run = stream.StreamRun(sources.parse_source(str(src)), net, dataclasses.replace(desc, window_sec=1.28),
                           stream_state.StreamSettings(stride=16, clip_sec=1.28, tube_events=str(events), speed=0.5),
                           CPU, None)
    stats = run.run()
    assert stats.skipped == 0 and stats.predictions == 4
    _same_tubes(run.live.final, results[0].tubes)
    rows = _rows(events)
    assert len(rows) == 2 * len(results[0].tubes) == stats.tube_events
    assert {r["tube_id"] for r in rows if r["event"] == "start"} == {r["tube_id"] for r in rows if r["event"] == "end"}


def test_tube_events_as_json_lines_on_stdout_and_log_on_stderr(tmp_path, tube_ckpt):
    # half speed, as the in-process test: at 4x a loaded machine skipped most clips and no tube started
    src = write_video(tmp_path / "v.mp4", np.zeros((50, 48, 64, 3), np.uint8))
    proc = subprocess.run([sys.executable, str(ROOT / "stream.py"), "--source", str(src), "--model_path",
                           str(tube_ckpt), "--tube_events", "-", "--precision", "fp32", "--speed", "0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows and all(list(r) == FIELDS for r in rows)
    assert [r["event"] for r in rows].count("start") == [r["event"] for r in rows].count("end")
    assert all(r["action_end_sec"] is None for r in rows if r["event"] == "start")
    assert "summary:" in proc.stderr and "tube #1" in proc.stderr


def test_tube_events_need_a_tube_mode_checkpoint(tmp_path, make_video, capsys):
    from conftest import tiny_checkpoint
    ck = tiny_checkpoint(tmp_path / "clip.pth")
    rc = stream.cli(["--source", str(make_video(n=20)), "--model_path", str(ck), "--tube_events",
                     str(tmp_path / "t.csv")])
    err = capsys.readouterr()
    assert rc == 2 and "need a tube-mode checkpoint" in err.err + err.out
    assert stream.cli(["--source", "x.mp4", "--webhook", "ftp://host/x"]) == 2


def _signal_once_a_tube_started(tmp_path, tube_ckpt, sig) -> tuple[subprocess.Popen, str, str]:
    """stream.py over a 20 s file with --tube_events, sent ``sig`` after its first "tube #" log line; returns the
    process (ended), that line and the rest of its output."""
    src = write_video(tmp_path / "long.mp4", np.zeros((500, 48, 64, 3), np.uint8))
    proc = subprocess.Popen([sys.executable, str(ROOT / "stream.py"), "--source", str(src), "--model_path",
                             str(tube_ckpt), "--tube_events", str(tmp_path / "tubes.csv"), "--precision", "fp32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = ""
    try:
        said = next((line for line in proc.stdout if "tube #" in line), "")
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, said, rest


def test_a_killed_stream_has_every_event_it_said_on_disk(tmp_path, tube_ckpt):
    """SIGKILL (no clean-up at all) once a tube has started: the file holds every row the log had announced."""
    _, said, _ = _signal_once_a_tube_started(tmp_path, tube_ckpt, signal.SIGKILL)
    events = tmp_path / "tubes.csv"
    assert "started" in said
    rows = _rows(events)
    assert events.read_text().endswith("\n") and rows[0]["event"] == "start" and rows[0]["tube_id"] == "1"


@pytest.mark.parametrize("receiver", ["healthy", "slow", "refusing", "dies"])
def test_webhook_gets_every_event_and_a_bad_receiver_never_delays_the_stream(tmp_path, tube_ckpt, monkeypatch,
                                                                             receiver):
    """Each tube event POSTed as JSON with the file's keys; a receiver that hangs or refuses changes neither the
    predictions (none skipped) nor the events file, and the run still ends at once."""
    from test_webhook import Receiver
    from conftest import free_port
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = Receiver(slow=receiver == "slow") if receiver != "refusing" else None
    url = server.url if server else f"http://127.0.0.1:{free_port()}/hook"
    if receiver == "dies":   # the receiver goes away after its first event
        def kill_after_first():
            deadline = time.monotonic() + 30
            while not server.accepted and time.monotonic() < deadline:
                time.sleep(0.01)
            server.stop()
        threading.Thread(target=kill_after_first, daemon=True).start()
    src = write_video(tmp_path / "v.mp4", np.zeros((75, 48, 64, 3), np.uint8))
    net, desc = inference.load_model(tube_ckpt, CPU)
    events = tmp_path / "tubes.csv"
    settings = stream_state.StreamSettings(stride=16, tube_events=str(events), webhook=url)
    run = stream.StreamRun(sources.parse_source(str(src)), net, desc, settings, CPU, None)
    t0 = time.monotonic()
    try:
        stats = run.run()
    finally:
        if server and receiver != "dies":
            server.stop()
    assert time.monotonic() - t0 < 75 / 25 + 10   # close waits 5 s at most for a bad receiver
    assert stats.skipped == 0 and stats.end == "ended"
    rows = _rows(events)
    assert rows and stats.tube_events == len(rows)
    sender = run.webhook
    assert sender.sent == len(rows)
    if receiver == "healthy":
        assert sender.delivered == len(rows)
        assert [r["event"] for r in server.accepted] == [r["event"] for r in rows]
        assert all(list(body) == FIELDS for body in server.accepted)
    elif receiver == "dies":
        assert sender.delivered >= 1 and sender.delivered + sender.failed + sender.undelivered == len(rows)
        assert server.accepted[0]["event"] == "start" and server.accepted[0]["tube_id"] == 1
    else:
        assert sender.delivered == 0 and sender.failed + sender.undelivered == len(rows)


def test_sigterm_ends_every_open_tube_in_the_file(tmp_path, tube_ckpt):
    """SIGTERM once a tube has started: the stream closes with an end row for every start row (exit code 143)."""
    proc, said, out = _signal_once_a_tube_started(tmp_path, tube_ckpt, signal.SIGTERM)
    assert "started" in said and proc.returncode == 143, out[-2000:]
    rows = _rows(tmp_path / "tubes.csv")
    starts = sorted(r["tube_id"] for r in rows if r["event"] == "start")
    assert starts and starts == sorted(r["tube_id"] for r in rows if r["event"] == "end")
    assert all(float(r["stream_time_sec"]) < 19 for r in rows)   # ended by the signal, not by the file's end
