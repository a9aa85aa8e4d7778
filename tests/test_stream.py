"""stream.py: live inference on a file played in real time and on MPEG-TS served by the test itself over loopback
(TCP and UDP on 127.0.0.1), sources that stall or die, a slow model (frames dropped, not queued), signals.
A tiny STAR (4 frames, 64x64) keeps it fast on a CPU; no camera, no network beyond loopback."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest
import torch

import capture
import checkpoint
import inference
import model as star_model
import predictor
import sources
import stream
import stream_outputs
import stream_state
from conftest import ROOT, frame_number, numbered_frames, write_video
from runtime import UsageError
from video import IMAGENET_MEAN, IMAGENET_STD

TINY_PREP = {"num_frames": 4, "img_size": 64, "mean": list(IMAGENET_MEAN),
             "std": list(IMAGENET_STD)}
FIELDS = list(stream_outputs.EVENT_FIELDS)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A project checkpoint of a random tiny-input STAR (scores ~0.3-0.5)."""
    torch.manual_seed(0)
    net = star_model.STAR(2).eval()
    ck = checkpoint.make_checkpoint(net, checkpoint.model_args_from(2), ["fight", "collapse"], TINY_PREP,
                                    raw_class_ids=[0, 1])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    checkpoint.save_checkpoint(ck, path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    """``(net, description)`` loaded once, as stream.py loads it."""
    return inference.load_model(tiny_ckpt, CPU)


def _run(tiny, spec, **settings):
    """run_stream with a low threshold (rows with detections) and fp32; returns the stats."""
    settings.setdefault("score_threshold", 0.3)
    net, desc = tiny
    return stream.run_stream(spec, net, desc, stream_state.StreamSettings(**settings), CPU, None)


def _events(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == FIELDS
    assert all(len(r) == len(FIELDS) for r in rows[1:]), "a row is incomplete"
    return [dict(zip(FIELDS, r)) for r in rows[1:]]


def _predictions(rows):
    """Rows grouped per prediction (one stream time each), in order."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["stream_time_sec"], []).append(r)
    return list(groups.values())


def _count_frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


# --------------------------------------------------------------------------- loopback servers


def mpegts_bytes(n: int, fps: int = 25) -> bytes:
    """``n`` numbered 64x48 frames as H.264 in MPEG-TS (a keyframe every 5 frames: a late reader syncs fast)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "5", "crf": "10"}
        for image in numbered_frames(n):
            for packet in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def send_paced(conn, data: bytes, seconds: float, slices: int = 40) -> None:
    """Send ``data`` in ``slices`` parts over ``seconds`` (a live source, not a burst)."""
    step = -(-len(data) // slices)
    for i in range(0, len(data), step):
        conn.sendall(data[i:i + step])
        time.sleep(seconds / slices)


class TcpServer:
    """Serves one plan per accepted connection on 127.0.0.1 from a thread; ``release`` ends any wait."""

    def __init__(self, plans):
        self.plans, self.release = list(plans), threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.sock.settimeout(20)
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        with contextlib.suppress(OSError):
            for plan in self.plans:
                conn, _ = self.sock.accept()
                with conn:
                    plan(conn, self)
        self.sock.close()

    def close(self):
        self.release.set()
        self.thread.join(timeout=10)
        self.sock.close()


def plan_whole(data, seconds=1.0):
    def plan(conn, _server):
        send_paced(conn, data, seconds)
    return plan


def plan_stall(data):
    """Half the stream, then silence with the connection open until released."""
    def plan(conn, server):
        send_paced(conn, data[: len(data) // 2], 0.5, 20)
        server.release.wait(20)
    return plan


def plan_die(data):
    """Half the stream, then a reset (the sender crashed)."""
    def plan(conn, _server):
        send_paced(conn, data[: len(data) // 2], 0.5, 20)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return plan


# --------------------------------------------------------------------------- pieces


def test_parse_source(tmp_path, make_video):
    assert sources.parse_source("rtsp://cam/1").options == {"rtsp_transport": "tcp"}
    assert sources.parse_source("udp://127.0.0.1:5000").kind == "url"
    assert sources.parse_source(str(make_video("a.mp4", n=3))).kind == "file"
    if sys.platform.startswith("linux"):
        assert sources.parse_source("0") == sources.SourceSpec("camera", "/dev/video0", "v4l2", {})
    with pytest.raises(UsageError, match="no such video file"):
        sources.parse_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(UsageError, match="KEY=VALUE"):
        sources.parse_options(["novalue"])


def test_ring_samples_the_newest_window_uniformly():
    ring = capture.FrameRing(10, 64)
    frames = numbered_frames(23, 64, 64)
    for i, image in enumerate(frames):
        ring.push(capture.Frame(image, i / 25, 100.0 + i))
    job = ring.clip(4, 1 / 25)
    assert [frame_number(f) for f in job.frames] == list(13 + np.linspace(0, 9, 4).astype(int))
    assert job.start_sec == pytest.approx(13 / 25) and job.last_sec == pytest.approx(22 / 25)
    assert job.end_sec == pytest.approx(23 / 25) and job.arrival == 122.0
    assert ring.frames.shape == (10, 64, 64, 3)   # bounded: one window, whatever was pushed


def test_mailbox_keeps_only_the_newest():
    box = predictor.Mailbox()
    assert box.put(1) is False
    assert box.put(2) is True   # 1 was never taken: skipped
    assert box.take() == 2
    box.put(3)
    assert box.close(drop=True) is True and box.take() is None


# --------------------------------------------------------------------------- file source


def test_file_source_events_and_every_frame_annotated(tiny, tmp_path, make_video):
    src = make_video("in.mp4", n=40, fps=25)
    events, out = tmp_path / "ev" / "events.csv", tmp_path / "annotated.mp4"
    flushed = []   # per prediction: every row written so far is on disk when the prediction is published
    settings = stream_state.StreamSettings(stride=4, score_threshold=0.3, events=str(events), output=str(out),
                                           speed=4.0)
    run = stream.StreamRun(sources.parse_source(str(src)), *tiny, settings, CPU, None,
                           on_prediction=lambda _pred: flushed.append(len(_events(events)) == run.stats.events_rows))
    stats = run.run()
    assert stats.end == "ended" and stats.frames == 40 and stats.dropped_frames == 0
    assert stats.clips == (40 - 4) // 4 + 1 and stats.predictions + stats.skipped == stats.clips
    assert flushed and all(flushed)
    rows = _events(events)
    assert len(rows) == stats.events_rows
    preds = _predictions(rows)
    assert len(preds) == stats.predictions
    times = [float(p[0]["stream_time_sec"]) for p in preds]
    assert times == sorted(times) and len(set(times)) == len(times)
    for p in preds:
        r = p[0]
        assert float(r["clip_end_sec"]) - float(r["clip_start_sec"]) == pytest.approx(4 / 25, abs=2e-3)
        assert float(r["latency_sec"]) >= 0
    assert _count_frames(out) == 40


def test_a_tube_mode_checkpoint_streams(tmp_path, make_video):
    """A tiny tube-mode STAR (8 frames, 4 queries): every prediction's rows are its tubes (the clip view)."""
    torch.manual_seed(0)
    args = {"num_queries": 4, "tube_steps": 8, "dim_feedforward": 64, "num_decoder_layers": 2, "max_positions": 1000}
    net = star_model.STAR(2, **args).eval()
    ck = checkpoint.make_checkpoint(net, checkpoint.model_args_from(2, **args), ["fight", "collapse"],
                                    {**TINY_PREP, "num_frames": 8})
    checkpoint.save_checkpoint(ck, tmp_path / "tube.pth")
    loaded = inference.load_model(tmp_path / "tube.pth", CPU)
    events, out = tmp_path / "events.csv", tmp_path / "annotated.mp4"
    stats = _run(loaded, sources.parse_source(str(make_video(n=24))), stride=8, score_threshold=0.0,
                 events=str(events), output=str(out), speed=4.0)
    assert stats.end == "ended" and stats.predictions >= 1
    rows = _events(events)
    assert len(rows) == 4 * stats.predictions and {r["pred_class"] for r in rows} <= {"fight", "collapse"}
    assert _count_frames(out) == 24


def test_clip_sec_window_and_no_object_rows(tiny, tmp_path, make_video):
    events = tmp_path / "events.csv"
    stats = _run(tiny, sources.parse_source(str(make_video(n=20))), stride=8, score_threshold=1.0, clip_sec=0.4,
                 events=str(events), speed=4.0)
    assert stats.window_frames == 10 and stats.clips == 2   # 0.4 s at 25 fps; clips end at frames 10 and 18
    rows = _events(events)
    assert stats.predictions == len(rows) >= 1
    assert {r["pred_class"] for r in rows} == {"no_object"} and rows[0]["x1"] == ""
    assert float(rows[0]["clip_end_sec"]) - float(rows[0]["clip_start_sec"]) == pytest.approx(0.4, abs=2e-3)


def test_show_without_a_display_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    display = stream_outputs.Display(True)
    assert display.show(np.zeros((8, 8, 3), np.uint8), []) is True
    display.close()
    assert [r.message for r in caplog.records if "--show" in r.message] == [
        "--show: no display here (DISPLAY/WAYLAND_DISPLAY unset); not showing the stream"]


def test_slow_model_drops_clips_not_queues(tiny, tmp_path, make_video, monkeypatch):
    real = inference.predict_clips

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_clips", slow)
    events = tmp_path / "events.csv"
    stats = _run(tiny, sources.parse_source(str(make_video(n=50))), stride=1, events=str(events))
    assert stats.frames == 50 and stats.clips == 47
    assert stats.skipped > 0 and stats.predictions + stats.skipped == stats.clips
    assert stats.predictions <= 2 / 0.25 + 2   # ~2 s of stream at 0.25 s a prediction
    assert stats.max_queued_frames <= 25       # the frame queue: one second at 25 fps
    # The newest clip each time: no growing lag (queueing the skipped clips would take >= 10 s at 0.25 s each).
    assert max(stats.latencies) < 3.0
    assert len(_predictions(_events(events))) == stats.predictions


# --------------------------------------------------------------------------- network sources


def test_tcp_stream_served_on_loopback(tiny, tmp_path):
    server = TcpServer([plan_whole(mpegts_bytes(40))])
    try:
        events = tmp_path / "events.csv"
        stats = _run(tiny, sources.parse_source(server.url), stride=4, events=str(events), stall_sec=5,
                     output=str(tmp_path / "a.mp4"))
    finally:
        server.close()
    assert stats.end == "ended" and stats.frames == 40 and stats.dropped_frames == 0
    preds = _predictions(_events(events))
    assert len(preds) == stats.predictions >= 2 and stats.predictions + stats.skipped == stats.clips == 10
    times = [float(p[0]["stream_time_sec"]) for p in preds]
    assert times == sorted(times)
    assert _count_frames(tmp_path / "a.mp4") == 40


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_udp_mpegts_written_by_pyav(tiny, tmp_path):
    port = _free_udp_port()
    done = threading.Event()

    def send():   # 25 fps until 3 predictions are made (10 s at most); the reader joins whenever it has bound
        with av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            s.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "5"}
            for image in numbered_frames(250):
                if done.is_set():
                    break
                for packet in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    c.mux(packet)
                time.sleep(0.04)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    events = tmp_path / "events.csv"
    settings = stream_state.StreamSettings(stride=4, score_threshold=0.3, events=str(events), stall_sec=2.0)
    run = stream.StreamRun(sources.parse_source(f"udp://127.0.0.1:{port}"), *tiny, settings, CPU, None,
                           on_prediction=lambda _pred: run.stats.predictions >= 3 and done.set())
    try:
        stats = run.run()
    finally:
        done.set()
        sender.join(timeout=10)
    assert stats.end == "stalled"   # UDP has no end: the sender's silence is a stall
    assert stats.frames >= 12 and stats.predictions >= 3
    assert len(_predictions(_events(events))) == stats.predictions


def test_stall_is_reported_and_outputs_closed(tiny, tmp_path):
    server = TcpServer([plan_stall(mpegts_bytes(60))])
    events, out = tmp_path / "events.csv", tmp_path / "a.mp4"
    try:
        t0 = time.monotonic()
        stats = _run(tiny, sources.parse_source(server.url), stride=4, events=str(events), output=str(out),
                     stall_sec=1.0)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert stats.end == "stalled" and "stalled" in stats.message and stream.EXIT_CODES[stats.end] == 1
    assert elapsed < 10
    assert stats.frames > 10
    assert len(_predictions(_events(events))) == stats.predictions > 0
    assert _count_frames(out) == stats.frames


def test_source_dying_mid_stream_keeps_every_event(tiny, tmp_path):
    server = TcpServer([plan_die(mpegts_bytes(60))])
    events = tmp_path / "events.csv"
    try:
        stats = _run(tiny, sources.parse_source(server.url), stride=2, events=str(events), stall_sec=2.0)
    finally:
        server.close()
    assert stats.end in ("ended", "broken")   # a reset may read as the end of the data or as an error
    assert stats.frames > 10 and stats.predictions > 0
    rows = _events(events)
    assert len(rows) == stats.events_rows and len(_predictions(rows)) == stats.predictions


def test_reconnect_after_the_source_dies(tiny, tmp_path):
    data = mpegts_bytes(40)
    server = TcpServer([plan_die(data), plan_whole(data)])
    try:
        stats = _run(tiny, sources.parse_source(server.url), stride=4, events=str(tmp_path / "e.csv"),
                     stall_sec=2.0, reconnect=True, reconnect_tries=2, backoff_sec=0.2)
    finally:
        server.close()
    assert stats.reconnects == 1
    assert stats.frames > 40   # half of the first connection, all of the second
    assert stats.end in ("broken", "stalled") and "gave up after 2" in stats.message
    rows = _events(tmp_path / "e.csv")
    times = [float(p[0]["stream_time_sec"]) for p in _predictions(rows)]
    assert times == sorted(times)   # the second connection's times continue the first's


# --------------------------------------------------------------------------- CLI


def test_bad_source_and_bad_model_exit_2(tmp_path, tiny_ckpt, make_video, capsys):
    assert stream.cli(["--source", str(tmp_path / "nope.mp4"), "--model_path", str(tiny_ckpt)]) == 2
    assert "no such video file" in "".join(capsys.readouterr())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert stream.cli(["--source", str(make_video(n=5)), "--model_path", str(bad)]) == 2


def test_unreachable_url_exits_2(tiny_ckpt, capsys):
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = stream.cli(["--source", f"tcp://127.0.0.1:{port}", "--model_path", str(tiny_ckpt), "--stall_sec", "2",
                     "--precision", "fp32"])
    assert rc == 2


def test_ctrl_c_closes_outputs_exit_130(tmp_path, tiny_ckpt):
    src = write_video(tmp_path / "long.mp4", numbered_frames(250), fps=25)   # 10 s
    events, out = tmp_path / "events.csv", tmp_path / "a.mp4"

    def interrupt():   # Ctrl-C once a prediction is on disk
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if events.exists() and len(events.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=interrupt)
    killer.start()
    try:
        rc = stream.cli(["--source", str(src), "--model_path", str(tiny_ckpt), "--events", str(events),
                         "--output", str(out), "--precision", "fp32", "--stats_json", str(tmp_path / "s.json")])
    finally:
        killer.join()
    assert rc == 130
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["end"] == "interrupted" and stats["frames"] < 250
    assert _count_frames(out) == stats["frames"]
    assert len(_events(events)) == stats["events_rows"]


def test_sigterm_closes_outputs(tmp_path, tiny_ckpt):
    src = write_video(tmp_path / "long.mp4", numbered_frames(300), fps=25)   # 12 s
    events, out, js = tmp_path / "events.csv", tmp_path / "a.mp4", tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "stream.py"), "--source", str(src), "--model_path", str(tiny_ckpt),
           "--events", str(events), "--output", str(out), "--precision", "fp32", "--stride", "4",
           "--stats_json", str(js)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and proc.poll() is None:
            if events.exists() and len(events.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143, proc.stderr.read().decode()[-2000:]
    stats = json.loads(js.read_text())
    assert stats["end"] == "terminated" and 0 < stats["frames"] < 300
    assert _count_frames(out) == stats["frames"]
    assert events.read_text().endswith("\n") and len(_events(events)) == stats["events_rows"]
