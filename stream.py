#!/usr/bin/env python
"""STAR on a live source: a camera, a network stream, or a video file played as a camera delivers it.

    python stream.py --source rtsp://camera/stream --model_path best_model.pth \
        --events events.csv --output annotated.mp4 [--stride 8] [--reconnect]
    python stream.py --source rtsp://camera/stream --model_path tube_model.pth \
        --tube_events tubes.csv [--webhook http://host/hook] --output annotated.mp4

``--source`` is a camera index (``0`` = ``/dev/video0`` through v4l2 on Linux, avfoundation on macOS),
a URL (``rtsp://``, ``http(s)://``, ``udp://``, ``tcp://``, ...; FFmpeg opens it, with a timeout) or a
video file, played at its own frame rate (times ``--speed``).

Three threads, every buffer between them bounded, so memory stays flat however long the stream:

- reader: decodes the source, stamps each frame's arrival and hands it to a queue of about one
  second of frames; when that queue is full the oldest frame is dropped and counted (a live source
  cannot wait). A file's reader sleeps to the frame clock.
- main loop: resizes each frame to the model's input into a ring buffer holding one clip window,
  draws the latest detections into ``--output`` / ``--show``, and every ``--stride`` frames hands the
  newest clip to the predictor through a one-slot mailbox. A clip still waiting there is replaced
  and counted as skipped, so the network always runs on the newest clip and nothing queues up
  (unlike demos that queue every clip and fall minutes behind).
- predictor: runs the network, appends the detections to ``--events`` (flushed every row) and
  publishes them for drawing.

With a tube-mode checkpoint the predictor also joins each clip's actors into tubes (``tube_events.LiveTubes``:
test.py's joining rules, one clip at a time): ``--tube_events`` gets a ``start`` row per tube once it spans
``--tube_start_sec`` and an ``end`` row once its actor stopped, left or changed action; ``--webhook`` gets the same
rows as JSON (``webhook.WebhookSender``: its own thread, never in the way of frames); ``--output`` draws each tube's
box and ``#id`` at every frame once the predictions cover it (frames wait in a bounded buffer).

A live clip is the last W frames, W = ``--clip_sec`` x the source's frame rate (default: the training
window a checkpoint stores, else T frames at the source rate, T = the model's frame count); T frames
are sampled uniformly over them with the offline rule (``video.sample_indices``), the newest always
included. Latency = wall time from the arrival of a clip's last frame to its result.

Exit codes: 0 at the stream's end (or ``--max_seconds``), 1 when the stream stalled or broke and was
not recovered, 2 (one line) for a bad source, model or output, 130 on Ctrl-C, 143 on SIGTERM; every
output file is closed first.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import queue
import signal
import sys
import threading
import time
from typing import Iterator

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

import inference
import model as star_model
import tube_events
import tubes
import video
import webhook
from files import write_text
from runtime import (UsageError, autocast_settings, number, one_line, resolve_device, run_cli, setup_logging,
                     writable_dir)

log = logging.getLogger("star.stream")

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
EVENT_FIELDS = ("stream_time_sec", "wall_time", "latency_sec", "pred_class", "score", "x1", "y1", "x2", "y2",
                "clip_start_sec", "clip_end_sec")
EXIT_CODES = {"ended": 0, "max_seconds": 0, "stalled": 1, "broken": 1, "failed": 1, "interrupted": 130,
              "terminated": 143}
TUBE_START_SEC = tube_events.START_SEC
ANNOTATE_BUFFER_BYTES = 512 * 2**20   # tube mode's --output: frames waiting for their predictions, at most
FRAME_QUEUE_SEC = 1.0     # frames the reader may run ahead of the main loop before dropping the oldest
LATENCY_KEEP = 100_000    # latencies kept for the percentiles (bounded: hours of predictions)
STATUS_EVERY_SEC = 1.0    # live status line refresh
STATUS_LOG_SEC = 10.0     # status as a log line when stderr is not a terminal
MAX_BACKOFF_SEC = 30.0
DEFAULT_FPS = 25.0        # a live source that states no usable rate
# What reading a source may raise besides VideoError: FFmpeg errors (a read timeout is av.error.ExitError),
# OS errors, and odd stream parameters.
READ_ERRORS = inference.DECODE_ERRORS
# What a prediction may raise: a failed kernel or out of memory (RuntimeError), a clip an ONNX model refuses
# (ValueError), and an events file that cannot be written (OSError).
PREDICT_ERRORS = (RuntimeError, ValueError, OSError, MemoryError)


class SourceError(Exception):
    """A source that cannot be opened or read; one line naming it."""


class Stalled(Exception):
    """A live source gave no data for its read timeout (--stall_sec)."""


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What ``--source`` names: ``kind`` is ``file``, ``url`` or ``camera``; ``target`` what FFmpeg opens."""

    kind: str
    target: str
    format: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.kind != "file"


def parse_source(text: str, options: dict | None = None) -> SourceSpec:
    """``--source`` as a :class:`SourceSpec`; UsageError (one line) when it names nothing usable."""
    options = dict(options or {})
    if text.isdigit() or text.startswith("/dev/video"):
        return _camera_spec(text, options)
    if text.lower().startswith(URL_SCHEMES):
        if text.lower().startswith(("rtsp://", "rtsps://")):
            options.setdefault("rtsp_transport", "tcp")   # UDP RTP loses packets on busy networks: grey frames
        return SourceSpec("url", text, None, options)
    path = pathlib.Path(text)
    if not path.is_file():
        raise UsageError(f"--source {text}: no such video file (or a camera index, or a URL: "
                         f"{', '.join(s[:-3] for s in URL_SCHEMES)})")
    return SourceSpec("file", str(path), None, options)


def _camera_spec(text: str, options: dict) -> SourceSpec:
    """A camera index or device: v4l2 on Linux, avfoundation on macOS."""
    if sys.platform.startswith("linux"):
        device = text if text.startswith("/dev/") else f"/dev/video{int(text)}"
        return SourceSpec("camera", device, "v4l2", options)
    if sys.platform == "darwin" and text.isdigit():
        return SourceSpec("camera", text, "avfoundation", options)
    raise UsageError(f"--source {text}: camera indices work on Linux (v4l2) and macOS (avfoundation); "
                     "elsewhere pass the camera's URL or an FFmpeg device as a URL")


def parse_options(pairs) -> dict:
    """``KEY=VALUE`` strings (``--source_option``) as a dict of FFmpeg options."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--source_option {pair!r}: expected KEY=VALUE (an FFmpeg option)")
        out[key] = value
    return out


class FileSource:
    """A video file's frames with their times on the frame clock (``i / fps``, as test.py's windows)."""

    live = False

    def __init__(self, spec: SourceSpec):
        self.path = spec.target
        try:
            info = video.probe_video(self.path, count_frames=False)
        except READ_ERRORS as err:
            raise SourceError(f"--source {self.path}: {one_line(err, self.path)}") from None
        self.fps, self.width, self.height = info.fps, info.width, info.height

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        for i, image in enumerate(video.iter_frames(self.path)):
            yield image, i / self.fps

    def close(self) -> None:
        """Nothing held between frames (iter_frames closes its container)."""


class LiveSource:
    """A camera or URL opened by FFmpeg with a timeout: a read that waits longer raises ``av.error.ExitError``."""

    live = True

    def __init__(self, spec: SourceSpec, timeout_sec: float):
        self.timeout_sec = timeout_sec
        try:
            self.container = av.open(spec.target, format=spec.format, options=dict(spec.options),
                                     timeout=(timeout_sec, timeout_sec))
        except READ_ERRORS as err:
            raise SourceError(f"--source {spec.target}: cannot open ({one_line(err, spec.target)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise SourceError(f"--source {spec.target}: no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "SLICE"   # frame threads would hold several frames back: latency
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate and 1 <= float(rate) <= 240 else DEFAULT_FPS
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height

    def frames(self) -> Iterator[tuple[np.ndarray, float | None]]:
        """Decoded frames with their timestamps; raises :class:`Stalled` when reads wait out the timeout."""
        for packet in self._packets():
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:   # one damaged packet: FFmpeg conceals, go on
                continue
            for frame in decoded:
                yield frame.to_ndarray(format="rgb24"), frame.time

    def _packets(self) -> Iterator:
        """The demuxer's packets. A read cut by the timeout still hands over the packets the demuxer held
        (a last frame or two) before the error comes, so a stall is told by a read that waited out the
        timeout just before the error, not by the time since the last frame."""
        packets = self.container.demux(self.stream)
        waited = None   # (start, end) of the latest read that waited out most of the timeout
        while True:
            started = time.monotonic()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.ExitError:
                now = time.monotonic()
                if now - started >= 0.9 * self.timeout_sec:
                    waited = (started, now)
                if waited is not None and now - waited[1] < self.timeout_sec:
                    raise Stalled(f"stalled: no data for {now - waited[0]:.1f} s") from None
                raise
            if time.monotonic() - started >= 0.9 * self.timeout_sec:
                waited = (started, time.monotonic())
            yield packet

    def close(self) -> None:
        with contextlib.suppress(*READ_ERRORS):
            self.container.close()


def open_source(spec: SourceSpec, timeout_sec: float):
    """A :class:`FileSource` or :class:`LiveSource`; SourceError (one line) when it cannot be opened."""
    return LiveSource(spec, timeout_sec) if spec.live else FileSource(spec)


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Frame:
    """One decoded frame: RGB image, stream time (s), arrival (``time.monotonic``)."""

    image: np.ndarray
    time_sec: float
    arrival: float


class StopFlag:
    """Asks every loop to stop, once, and remembers why (the first reason wins)."""

    def __init__(self):
        self._event, self.reason = threading.Event(), None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(max(0.0, seconds))


@dataclasses.dataclass
class StreamStats:
    """What happened; each counter is written by one thread only. ``end`` is a key of EXIT_CODES."""

    end: str = "ended"
    message: str = ""
    frames: int = 0                 # frames through the main loop (each one in --output)
    frames_read: int = 0
    dropped_frames: int = 0         # the main loop fell a whole queue behind: oldest frames dropped
    clips: int = 0                  # clips handed to the predictor (one every --stride frames)
    predictions: int = 0
    skipped: int = 0                # clips replaced by a newer one before the predictor took them
    events_rows: int = 0
    tube_events: int = 0            # tube mode: start and end events said
    reconnects: int = 0
    max_queued_frames: int = 0      # most frames ever waiting for the main loop (bounded by the queue)
    lag_sec: float = 0.0            # file source: how late the last frame was on its clock
    max_lag_sec: float = 0.0
    stream_sec: float = 0.0         # stream time of the last frame
    input_sec: float = 0.0          # wall seconds from the first frame's arrival to the last's
    seconds: float = 0.0
    window_frames: int = 0
    latencies: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LATENCY_KEEP))

    @property
    def input_fps(self) -> float:
        """Frames per second that went through the main loop (nan before two frames)."""
        return (self.frames - 1) / self.input_sec if self.input_sec > 0 else float("nan")

    def latency(self, q: float) -> float:
        """The ``q`` quantile of the latencies (nan before the first prediction)."""
        values = self.latencies.copy()   # one C call: the predictor thread may append meanwhile
        return float(np.quantile(values, q)) if values else float("nan")

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "latencies"}
        out.update(input_fps=self.input_fps, latency_median_sec=self.latency(0.5), latency_p95_sec=self.latency(0.95),
                   latencies_sec=[round(v, 4) for v in self.latencies])
        return out


@dataclasses.dataclass
class StreamSettings:
    """How a stream is cut, predicted and written (the CLI's flags; tests and the bench build it directly)."""

    stride: int = 8
    clip_sec: float | None = None
    score_threshold: float = 0.5
    events: str | None = None
    tube_events: str | None = None
    tube_start_sec: float = TUBE_START_SEC
    webhook: str | None = None
    output: str | None = None
    show: bool = False
    reconnect: bool = False
    reconnect_tries: int = 5
    backoff_sec: float = 1.0
    stall_sec: float = 10.0
    max_seconds: float | None = None
    speed: float = 1.0

    def __post_init__(self):
        if self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise UsageError(f"--score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.webhook:
            webhook.check_url(self.webhook)


# --------------------------------------------------------------------------- ring buffer and mailbox


def window_frames(num_frames: int, fps: float, clip_sec: float | None) -> int:
    """Frames a live clip spans: ``clip_sec`` at the source rate, else the model's T frames."""
    return num_frames if clip_sec is None else video.seconds_to_frames(clip_sec, fps)


@dataclasses.dataclass
class ClipJob:
    """A clip for the predictor: T frames at the model's size and where they sit in the stream."""

    frames: np.ndarray       # (T, S, S, 3) uint8
    start_sec: float
    last_sec: float          # stream time of the newest frame
    end_sec: float           # last_sec + one frame
    arrival: float           # monotonic arrival of the newest frame: latency counts from here
    span: tuple = (0, 0)     # the stream frames [first, end) it covers (0-based over the stream)
    frame_indices: np.ndarray | None = None   # (T,) the stream frame each of its frames is


class FrameRing:
    """The last ``size`` frames, already resized to the model's input (as ``video.preprocess`` resizes),
    with their stream times and arrivals: one clip window of small frames, whatever the source size."""

    def __init__(self, size: int, img_size):
        self.size = int(size)
        self.h, self.w = (img_size, img_size) if np.isscalar(img_size) else tuple(img_size)
        self.frames = np.zeros((self.size, self.h, self.w, 3), np.uint8)
        self.times = np.zeros(self.size)
        self.arrivals = np.zeros(self.size)
        self.count = 0

    def push(self, frame: Frame) -> None:
        k = self.count % self.size
        image = np.ascontiguousarray(frame.image)
        same = image.shape[:2] == (self.h, self.w)
        self.frames[k] = image if same else cv2.resize(image, (self.w, self.h), interpolation=cv2.INTER_LINEAR)
        self.times[k], self.arrivals[k] = frame.time_sec, frame.arrival
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def clip(self, num_frames: int, frame_sec: float) -> ClipJob:
        """The newest window, T frames sampled uniformly (oldest first; the newest frame always in)."""
        order = (self.count + np.arange(self.size)) % self.size   # oldest .. newest slot
        steps = video.sample_indices(self.size, num_frames)
        first, last = order[0], order[-1]
        span = (self.count - self.size, self.count)
        return ClipJob(self.frames[order[steps]], float(self.times[first]), float(self.times[last]),
                       float(self.times[last]) + frame_sec, float(self.arrivals[last]), span, span[0] + steps)


class Mailbox:
    """One slot between the main loop and the predictor: ``put`` replaces a waiting item, ``take`` waits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item, self._closed = None, False

    def put(self, item) -> bool:
        """Leave ``item``; True when it replaced one the predictor never took (skipped work)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self):
        """The waiting item (waits for one); None once closed and empty."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            return item

    def close(self, drop: bool) -> bool:
        """No more items; ``drop`` discards a waiting one (returns True when it did)."""
        with self._cond:
            dropped = drop and self._item is not None
            if drop:
                self._item = None
            self._closed = True
            self._cond.notify_all()
            return dropped


# --------------------------------------------------------------------------- outputs


@dataclasses.dataclass
class Prediction:
    """The network's answer for one clip."""

    job: ClipJob
    detections: list            # [inference.Detection], best first
    best_score: float
    latency: float
    wall_time: str
    clip_tubes: list | None = None   # tube mode: the clip's tubes (tubes.clip_tubes), stream frames


class EventsWriter:
    """``events.csv``: one row per detection per prediction (a ``no_object`` row when there is none),
    flushed after every row so a reader, or a crash, sees every prediction made so far."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", newline="", encoding="utf-8")   # noqa: SIM115 (closed in close())
        except OSError as err:
            raise UsageError(f"--events {self.path}: cannot write ({err.strerror or err})") from None
        self._csv = csv.writer(self._file)
        self._row(EVENT_FIELDS)

    def _row(self, values) -> None:
        self._csv.writerow(values)
        self._file.flush()

    def write(self, pred: Prediction) -> int:
        """Append ``pred``'s rows; returns how many."""
        job = pred.job
        head = (f"{job.last_sec:.3f}", pred.wall_time, f"{pred.latency:.3f}")
        tail = (f"{job.start_sec:.3f}", f"{job.end_sec:.3f}")
        if not pred.detections:
            self._row((*head, inference.NO_OBJECT, f"{pred.best_score:.4f}", "", "", "", "", *tail))
            return 1
        for d in pred.detections:
            box = (f"{min(max(v, 0.0), 1.0):.4f}" for v in d.box)
            self._row((*head, d.class_name, f"{d.score:.4f}", *box, *tail))
        return len(pred.detections)

    def close(self) -> None:
        self._file.close()


class AnnotatedWriter:
    """``--output``: every frame at the source's size and rate (H.264), the latest detections drawn.
    The file is created at the first frame (a live source's size is known only then)."""

    def __init__(self, path, fps: float):
        self.path, self.fps, self._writer = pathlib.Path(path), fps, None

    def write(self, image: np.ndarray, detections) -> None:
        self._write_drawn(image, drawn(detections))

    def _write_drawn(self, image: np.ndarray, shown: list) -> None:
        if self._writer is None:
            self._writer = video.H264Writer(self.path, image.shape[1], image.shape[0], self.fps)
        self._writer.write(video.draw_detections(image, shown) if shown else image)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            log.warning("--output %s: no frame arrived, no video written", self.path)


class TubeVideoWriter(AnnotatedWriter):
    """``--output`` with a tube-mode model: each frame waits until the predictions cover it and ``hold`` frames more
    (a tube is drawn from its first frame once its start is said), then every started tube's predicted box at that
    frame is drawn with class, score and ``#id``; never a box ahead of a prediction. Frames waiting take at most
    ``max_bytes``; past that the oldest is written with what is known."""

    def __init__(self, path, fps: float, live: tube_events.LiveTubes, hold: int, max_bytes: int = ANNOTATE_BUFFER_BYTES):
        super().__init__(path, fps)
        self.live, self.hold, self.max_bytes = live, int(hold), int(max_bytes)
        self.waiting: collections.deque = collections.deque()   # (frame index, image), oldest first

    def write(self, image: np.ndarray, index: int) -> None:
        self.waiting.append((index, image))
        self.drain()

    def drain(self, everything: bool = False) -> None:
        covered = self.live.covered
        while self.waiting:
            index, image = self.waiting[0]
            full = len(self.waiting) * image.nbytes > self.max_bytes
            if not (everything or full or index + self.hold < covered):
                return
            self.waiting.popleft()
            self._write_drawn(image, self.live.boxes_at(index))
            self.live.forget_before(index)

    def close(self) -> None:
        self.drain(everything=True)
        super().close()


def drawn(detections) -> list[tuple]:
    """``[inference.Detection]`` as video.draw_detections takes them: ``(class_name, score, box)``."""
    return [(d.class_name, d.score, d.box) for d in detections]


def has_display() -> bool:
    """Whether a window can be shown (Linux needs an X or Wayland display)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class Display:
    """``--show``: an OpenCV window with the annotated frames; ``q`` or Esc stops. Warns once and turns
    itself off where there is no display or OpenCV was built without windows (opencv-python-headless)."""

    TITLE = "STAR stream (q to quit)"

    def __init__(self, enabled: bool):
        self.enabled = enabled and has_display()
        if enabled and not self.enabled:
            log.warning("--show: no display here (DISPLAY/WAYLAND_DISPLAY unset); not showing the stream")

    def show(self, image: np.ndarray, shown: list) -> bool:
        """Show one frame with ``shown`` drawn (video.draw_detections' tuples); False when the user asked to stop (a
        normal end)."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(self.TITLE, cv2.cvtColor(video.draw_detections(image, shown), cv2.COLOR_RGB2BGR))
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as err:
            log.warning("--show: OpenCV cannot open a window (%s); not showing the stream", one_line(err))
            self.enabled = False
            return True
        return key not in (ord("q"), 27)

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()


# --------------------------------------------------------------------------- threads


class FrameReader(threading.Thread):
    """Reads the source into ``frames`` (bounded: full -> the oldest frame is dropped and counted),
    plays a file on its frame clock, reopens a live source with back-off when asked to, and ends
    with ``None`` in the queue; ``outcome`` is then ``(end, message)``."""

    def __init__(self, spec: SourceSpec, source, frames: queue.Queue, halt: threading.Event,
                 settings: StreamSettings, stats: StreamStats):
        super().__init__(name="stream-reader", daemon=True)   # daemon: a driver stuck in C cannot block exit
        self.spec, self.source, self.frames, self.halt = spec, source, frames, halt
        self.settings, self.stats = settings, stats
        self.outcome = ("ended", "")
        self.last_activity = time.monotonic()   # the watchdog's view: a frame, an open attempt or a back-off
        self._last_t: float | None = None
        self._last_arrival = 0.0

    def run(self) -> None:
        try:
            self.outcome = self._run()
        finally:
            self._put(None)

    def _run(self) -> tuple[str, str]:
        source = self.source
        while True:
            end, message = self._play(source)
            if end == "stopped" or not (self.spec.live and self.settings.reconnect):
                return end, message
            message = message or "the stream ended"
            log.warning("source %s: %s; reconnecting", self.spec.target, message)
            source = self._reopen()
            if source is None and self.halt.is_set():
                return "stopped", ""
            if source is None:   # asked to stay connected and could not: a broken stream, even after a clean end
                return ("broken" if end == "ended" else end,
                        f"{message}; gave up after {self.settings.reconnect_tries} reconnection tries")
            self.stats.reconnects += 1

    def _reopen(self):
        """The source again, after back-off (1, 2, 4... s, at most MAX_BACKOFF_SEC); None when every try
        failed or a stop came."""
        for attempt in range(self.settings.reconnect_tries):
            delay = min(MAX_BACKOFF_SEC, self.settings.backoff_sec * 2 ** attempt)
            self.last_activity = time.monotonic() + delay   # the watchdog must not count a back-off as a stall
            if self.halt.wait(delay):
                return None
            self.last_activity = time.monotonic()
            try:
                source = open_source(self.spec, self.settings.stall_sec)
            except SourceError as err:
                log.warning("reconnection %d/%d failed: %s", attempt + 1, self.settings.reconnect_tries,
                            one_line(err))
                continue
            log.info("source %s reopened", self.spec.target)
            return source
        return None

    def _play(self, source) -> tuple[str, str]:
        """Read ``source`` to its end; ``(end, message)`` with end ``ended``, ``stalled``, ``broken`` or ``stopped``."""
        frames = source.frames()
        clock0, pts0, base = None, None, None
        try:
            for image, pts in frames:
                if self.halt.is_set():
                    return "stopped", ""
                if source.live:
                    if base is None:   # a new connection: its times continue the stream's, after the gap
                        base, pts0 = self._continue_time(), pts
                    t = self._live_time(base, pts, pts0, source.fps)
                else:
                    clock0 = time.monotonic() if clock0 is None else clock0
                    if self._sleep_to_clock(clock0 + pts / self.settings.speed):
                        return "stopped", ""
                    t = pts
                self._emit(image, t)
        except Stalled as err:
            return "stalled", str(err)
        except READ_ERRORS as err:
            return self._failure(err)
        finally:
            frames.close()
            source.close()
        return "ended", ""

    def _sleep_to_clock(self, due: float) -> bool:
        """Wait until ``due`` (a file plays as a camera delivers); records how late the frame is. True on stop."""
        if self.halt.wait(due - time.monotonic()):
            return True
        self.stats.lag_sec = max(0.0, time.monotonic() - due)
        self.stats.max_lag_sec = max(self.stats.max_lag_sec, self.stats.lag_sec)
        return False

    def _continue_time(self) -> float:
        """Where a (re)connection's stream time starts: 0, or the last time plus the wall-clock gap."""
        if self._last_t is None:
            return 0.0
        return self._last_t + max(time.monotonic() - self._last_arrival, 0.0)

    def _live_time(self, base: float, pts, pts0, fps: float) -> float:
        """Stream time from the frame's own timestamp; one frame on when it has none or goes back."""
        t = base + (pts - pts0) if pts is not None and pts0 is not None else None
        if self._last_t is not None and (t is None or t <= self._last_t):
            t = self._last_t + 1.0 / fps
        return base if t is None else t

    def _emit(self, image: np.ndarray, t: float) -> None:
        now = time.monotonic()
        self._last_t, self._last_arrival, self.last_activity = t, now, now
        self.stats.frames_read += 1
        self._put(Frame(image, t, now))

    def _put(self, item) -> None:
        """Into the bounded queue; when full, the oldest frame makes room (counted)."""
        while True:
            try:
                self.frames.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    if self.frames.get_nowait() is not None:
                        self.stats.dropped_frames += 1

    def _failure(self, err: BaseException) -> tuple[str, str]:
        """A read error other than a stall. An ``ExitError`` here came without a long wait: FFmpeg's UDP
        receiving thread gives up when this reader asked for no data within the timeout (a starved CPU)."""
        hint = " (FFmpeg stopped waiting: was the CPU starved?)" if isinstance(err, av.error.ExitError) else ""
        return "broken", f"broken: {one_line(err, self.spec.target)}{hint}"


class Predictor(threading.Thread):
    """Takes the newest clip from the mailbox, runs the network, hands the :class:`Prediction` on."""

    def __init__(self, model, info: dict, device, dtype, threshold: float, mailbox: Mailbox, on_result):
        super().__init__(name="stream-predictor", daemon=True)
        self.model, self.info, self.device, self.dtype = model, info, device, dtype
        self.threshold, self.mailbox, self.on_result = threshold, mailbox, on_result
        self.error: str | None = None
        self.failed = threading.Event()
        self.tube_mode = False   # known after warm_up: the network predicts per-step boxes

    def warm_up(self) -> float:
        """One prediction on a blank clip (kernel selection, allocations), so the first real clip is not late."""
        t0 = time.perf_counter()
        s = self.info["img_size"]
        h, w = (s, s) if np.isscalar(s) else tuple(s)
        t = self.info["num_frames"]
        pred = self.predict(ClipJob(np.zeros((t, h, w, 3), np.uint8), 0.0, 0.0, 0.0, time.monotonic(), (0, t),
                                    np.arange(t)))
        self.tube_mode = pred.clip_tubes is not None
        return time.perf_counter() - t0

    def predict(self, job: ClipJob) -> Prediction:
        clip = video.preprocess(job.frames, self.info["img_size"], self.info["mean"], self.info["std"])
        pred = inference.predict_clips(self.model, clip[None], self.device, self.dtype)[0]
        clip_tubes = None
        if "step_scores" in pred:   # tube mode: a clip's queries on one actor are one detection, as in test.py
            pred = tubes.merge_duplicate_queries(pred, self.threshold)
            clip_tubes = tubes.clip_tubes(pred, job.frame_indices, job.span, self.threshold, self.info["class_names"])
        dets = inference.detections_from_prediction(pred, self.info["class_names"], self.threshold,
                                                    job.start_sec, job.end_sec)
        best = float(pred["scores"].max()) if pred["scores"].numel() else 0.0
        latency = time.monotonic() - job.arrival
        wall = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
        return Prediction(job, dets, best, latency, wall, clip_tubes)

    def run(self) -> None:
        while (job := self.mailbox.take()) is not None:
            try:
                self.on_result(self.predict(job))
            except PREDICT_ERRORS as err:
                self.error = f"prediction failed: {one_line(err)}"
                self.failed.set()
                return


# --------------------------------------------------------------------------- the run


class StatusLine:
    """Input fps, predictions per second, latency, skipped and dropped work: a live line on a terminal
    (tqdm, so log lines do not break it), else a log line every STATUS_LOG_SEC."""

    def __init__(self, stats: StreamStats):
        self.stats = stats
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(bar_format="{desc}", file=sys.stderr, disable=not self.tty, dynamic_ncols=True)
        self._last = (time.monotonic(), 0, 0)
        self._logged = time.monotonic()

    def update(self, force: bool = False) -> None:
        now, s = time.monotonic(), self.stats
        t0, frames0, preds0 = self._last
        if now - t0 < STATUS_EVERY_SEC and not force:
            return
        dt = max(now - t0, 1e-9)
        lat = s.latencies[-1] if s.latencies else float("nan")
        text = (f"t={s.stream_sec:.1f}s in {(s.frames - frames0) / dt:.1f} fps | {(s.predictions - preds0) / dt:.2f} "
                f"pred/s | latency {lat:.2f}s (median {s.latency(0.5):.2f}) | skipped {s.skipped}/{s.clips} "
                f"| dropped frames {s.dropped_frames}" + (f" | lag {s.lag_sec:.2f}s" if s.max_lag_sec else ""))
        self._last = (now, s.frames, s.predictions)
        if self.tty:
            self.bar.set_description_str(text)
        elif now - self._logged >= STATUS_LOG_SEC:
            self._logged = now
            log.info("%s", text)

    def close(self) -> None:
        self.bar.close()


class StreamRun:
    """One run: opens the source, starts the reader and the predictor, and drives the main loop.
    ``run()`` returns the :class:`StreamStats`; every output is closed and every thread joined first."""

    def __init__(self, spec: SourceSpec, model, info: dict, settings: StreamSettings, device, dtype,
                 stop: StopFlag | None = None, on_prediction=None):
        self.spec, self.info, self.settings = spec, info, settings
        self.stop = stop or StopFlag()
        self.on_prediction = on_prediction
        self.stats = StreamStats()
        self.halt = threading.Event()
        self.mailbox = Mailbox()
        self.predictor = Predictor(model, info, device, dtype, settings.score_threshold, self.mailbox, self._result)
        self.first_arrival = 0.0
        self.latest: list = []      # the newest prediction's detections, drawn on every frame until the next
        self.events = self.writer = self.reader = self.ring = None
        self.live: tube_events.LiveTubes | None = None    # tube mode: tubes and their events
        self.tube_file: tube_events.EventFile | None = None
        self.webhook: webhook.WebhookSender | None = None
        self.display = Display(settings.show)

    def _result(self, pred: Prediction) -> None:
        """In the predictor thread: write the events, link the clip's tubes, publish the detections."""
        if self.events is not None:
            self.stats.events_rows += self.events.write(pred)
        if self.live is not None and pred.clip_tubes is not None:
            self._say(self.live.update(pred.clip_tubes, pred.job.span, pred.job.arrival))
        self.latest = pred.detections   # one reference assignment: the main loop reads whole lists
        self.stats.latencies.append(pred.latency)
        self.stats.predictions += 1
        if self.on_prediction is not None:
            self.on_prediction(pred)

    def _say(self, events: list) -> None:
        """Tube events to the log, ``--tube_events`` and ``--webhook``."""
        for event in events:   # the file first: whatever the log says is on disk
            if self.tube_file is not None:
                self.tube_file.write(event)
            if self.webhook is not None:
                self.webhook.send(event.as_dict())
            self.stats.tube_events += 1
            log.info("tube #%d %s %s at %.2f s (score %.2f)", event.tube_id, event.pred_class,
                     "started" if event.event == "start" else "ended",
                     event.action_start_sec if event.event == "start" else event.action_end_sec, event.score)

    def run(self) -> StreamStats:
        self._warm_up()
        if (self.settings.tube_events or self.settings.webhook) and not self.predictor.tube_mode:
            raise UsageError("--tube_events and --webhook need a tube-mode checkpoint (one trained on per-frame "
                             "labels); this one predicts one box per clip: use --events")
        started = time.monotonic()   # the run's seconds count streaming, not loading
        try:
            source = open_source(self.spec, self.settings.stall_sec)
            self._start(source)
            self._loop(time.monotonic())
        finally:
            self._finish()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _warm_up(self) -> None:
        """One blank prediction before the source opens: a model that cannot run fails here (exit code 2)."""
        try:
            log.info("warm-up prediction: %.2f s", self.predictor.warm_up())
        except PREDICT_ERRORS as err:
            raise star_model.CheckpointError(f"the model cannot predict a {self.info['num_frames']}-frame clip of "
                                             f"{self.info['img_size']} px: {one_line(err)}") from None

    def _start(self, source) -> None:
        s, info = self.settings, self.info
        try:
            if self.predictor.tube_mode:
                self._start_tubes(source.fps)
            if s.events:
                self.events = EventsWriter(s.events)
            if s.output and self.live is not None:
                self.writer = TubeVideoWriter(_output_path(s.output), source.fps, self.live, self.live.start_frames)
            elif s.output:
                self.writer = AnnotatedWriter(_output_path(s.output), source.fps)
        except UsageError:
            source.close()
            raise
        if s.speed != 1.0 and source.live:
            log.warning("--speed applies to a file source only; a live source plays at its own rate")
        fps = source.fps * (1.0 if source.live else s.speed)
        self.ring = FrameRing(window_frames(info["num_frames"], source.fps, s.clip_sec), info["img_size"])
        self.stats.window_frames = self.ring.size
        self.frame_sec = 1.0 / source.fps
        log.info("source %s: %s, %dx%d at %.2f fps%s; live clip: the last %d frames (%.2f s), %d sampled uniformly, "
                 "predicted every %d frames", self.spec.target, self.spec.kind, source.width, source.height,
                 source.fps, f" played at {s.speed:g}x" if not source.live and s.speed != 1 else "", self.ring.size,
                 self.ring.size / source.fps, info["num_frames"], s.stride)
        frames = queue.Queue(maxsize=max(8, int(round(fps * FRAME_QUEUE_SEC))))
        self.frames = frames
        self.reader = FrameReader(self.spec, source, frames, self.halt, s, self.stats)
        self.predictor.start()
        self.reader.start()

    def _start_tubes(self, fps: float) -> None:
        """Tube mode: link tubes with test.py's rules at the source's rate; open --tube_events and --webhook."""
        linker = inference.tube_linker(fps)
        start = video.seconds_to_frames(self.settings.tube_start_sec, fps)
        self.live = tube_events.LiveTubes(linker, tube_events.FrameClock(fps), start, self.settings.stride)
        if self.settings.tube_events:
            self.tube_file = tube_events.EventFile(self.settings.tube_events)
        if self.settings.webhook:
            self.webhook = webhook.WebhookSender(self.settings.webhook)

    def _loop(self, started: float) -> None:
        status = StatusLine(self.stats)
        try:
            while not self._should_stop(started):
                try:
                    item = self.frames.get(timeout=0.1)
                except queue.Empty:
                    status.update()
                    continue
                if item is None:
                    end, message = self.reader.outcome
                    self.stop.set(end)
                    self.stats.message = message
                    break
                self.stats.max_queued_frames = max(self.stats.max_queued_frames, self.frames.qsize() + 1)
                self._on_frame(item)
                status.update()
        finally:
            status.update(force=True)
            status.close()

    def _should_stop(self, started: float) -> bool:
        """A stop asked for, the predictor failed, --max_seconds reached, or the reader stuck (watchdog)."""
        s = self.settings
        if self.predictor.failed.is_set():
            self.stop.set("failed")
            self.stats.message = self.predictor.error
        elif s.max_seconds is not None and time.monotonic() - started >= s.max_seconds:
            self.stop.set("max_seconds")
        elif self.spec.live and time.monotonic() - self.reader.last_activity > 2 * s.stall_sec + 5:
            # The reader's own read timeout should have fired; a driver that ignores it must not hang the run.
            self.stop.set("stalled")
            self.stats.message = f"stalled: the source gave nothing for {2 * s.stall_sec + 5:.0f} s"
        return self.stop.is_set()

    def _on_frame(self, frame: Frame) -> None:
        s = self.stats
        s.frames += 1
        s.stream_sec = frame.time_sec
        if s.frames == 1:
            self.first_arrival = frame.arrival
        s.input_sec = frame.arrival - self.first_arrival
        self.ring.push(frame)
        index = self.ring.count - 1
        if self.live is not None:
            self.live.clock.add(index, frame.time_sec)
        if self.ring.full and (self.ring.count - self.ring.size) % self.settings.stride == 0:
            s.clips += 1
            s.skipped += self.mailbox.put(self.ring.clip(self.info["num_frames"], self.frame_sec))
        detections = self.latest
        if self.writer is not None:
            try:
                self.writer.write(frame.image, index if self.live is not None else detections)
            except (video.VideoError, OSError) as err:
                self.stop.set("failed")
                self.stats.message = f"--output {self.settings.output}: {one_line(err)}"
        if not self.display.enabled:
            return
        # the window shows the newest prediction's detections, or each open tube's newest predicted box
        shown = drawn(detections) if self.live is None else [tube[:3] for tube in self.live.latest_boxes()]
        if not self.display.show(frame.image, shown):
            self.stop.set("ended")
            self.stats.message = "closed in the window (q)"

    def _finish(self) -> None:
        """Stop the reader, let the predictor finish (the last clip too at a normal end), close every output,
        join the threads."""
        self.halt.set()
        normal = self.stop.reason in (None, "ended", "max_seconds")
        self.stats.skipped += self.mailbox.close(drop=not normal)
        if self.predictor.is_alive():
            self.predictor.join()
        if self.predictor.error and self.stop.reason != "failed":
            self.stats.message = self.predictor.error
        self.stats.end = self.stop.reason or "ended"
        if self.live is not None and self.ring is not None:
            self._say(self.live.finish(max(self.ring.count - 1, 0), time.monotonic()))
        if self.webhook is not None:
            self.webhook.close()
            log.info("%s", self.webhook.summary())
        for output in (self.events, self.tube_file, self.writer, self.display):
            if output is not None:
                output.close()
        if self.reader is not None:
            self.reader.join(timeout=self.settings.stall_sec + 5)
            if self.reader.is_alive():
                log.warning("the source reader did not stop within %.0f s (stuck in the driver); leaving it",
                            self.settings.stall_sec + 5)


def _output_path(path) -> pathlib.Path:
    """``--output``'s path with its folder made and checked writable; UsageError when it is not."""
    path = pathlib.Path(path)
    writable_dir(path.parent, "--output")
    return path


def check_output_folders(args) -> None:
    """Every output's folder (``--output``, ``--events``, ``--stats_json``) made and writable, before the model is
    loaded: an unwritable folder is one line naming it, not a failure after the stream ran."""
    for flag in ("output", "events", "tube_events", "stats_json"):
        path = getattr(args, flag)
        if path and path != "-":
            writable_dir(pathlib.Path(path).parent, f"--{flag}")


def run_stream(spec: SourceSpec, model, info: dict, settings: StreamSettings, device, dtype=None,
               stop: StopFlag | None = None, on_prediction=None) -> StreamStats:
    """Stream ``spec`` through the model with ``settings``; returns the stats once everything is closed.
    Raises SourceError when the source cannot be opened at all, UsageError for an unwritable output."""
    return StreamRun(spec, model, info, settings, device, dtype, stop, on_prediction).run()


# --------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR on a live source: a camera, a network stream or a video "
                                     "file played in real time", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="camera index (0 = /dev/video0), URL (rtsp:// http(s):// udp:// tcp:// ...) or video file")
    parser.add_argument("--model_path", default="best_model.pth", help="STAR checkpoint (.pth) or ONNX export (.onnx)")
    parser.add_argument("--output", default=None, help="annotated H.264 MP4: every frame, the latest detections drawn")
    parser.add_argument("--events", default=None,
                        help="events CSV: one row per detection per prediction (no_object rows too), flushed every row")
    parser.add_argument("--tube_events", default=None,
                        help="tube-mode checkpoint: CSV with one row when a tube's action starts and one when it ends "
                             "(flushed every row); '-' writes JSON lines to stdout")
    parser.add_argument("--tube_start_sec", type=number(float, 0, strict=True), default=TUBE_START_SEC,
                        help="a tube's start is said once it spans this long: shorter answers sooner, longer says "
                             "fewer false starts")
    parser.add_argument("--webhook", default=None, metavar="URL",
                        help="tube-mode checkpoint: POST each tube event as JSON to this http(s) URL (own thread, "
                             "bounded queue, retries; a slow receiver never delays the stream)")
    parser.add_argument("--stride", type=number(int, 1), default=8, help="predict the newest clip every N frames")
    parser.add_argument("--clip_sec", type=number(float, 0, strict=True), default=None,
                        help="seconds a live clip spans, its T frames sampled uniformly over them (default: the "
                             "checkpoint's training window if stored, else T consecutive frames)")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="a query is a detection when its best foreground probability is at least this")
    parser.add_argument("--show", action="store_true", help="show the annotated stream in a window (q quits)")
    parser.add_argument("--reconnect", action="store_true",
                        help="reopen a camera or URL that stalls, breaks or ends, with back-off (never a file)")
    parser.add_argument("--reconnect_tries", type=number(int, 1), default=5,
                        help="reconnection attempts in a row before giving up (back-off 1, 2, 4 ... 30 s)")
    parser.add_argument("--stall_sec", type=number(float, 0, strict=True), default=10.0,
                        help="a source that gives no frame for this long has stalled (also FFmpeg's open timeout)")
    parser.add_argument("--max_seconds", type=number(float, 0, strict=True), default=None,
                        help="stop after this many seconds of wall time (exit code 0)")
    parser.add_argument("--speed", type=number(float, 0, strict=True), default=1.0,
                        help="file source: play at this multiple of its frame rate")
    parser.add_argument("--source_option", action="append", default=None, metavar="KEY=VALUE",
                        help="an FFmpeg option for opening the source (repeatable), e.g. rtsp_transport=udp")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--num_frames", type=number(int, 1), default=None,
                        help="frames per clip T (default: the checkpoint's; a raw state_dict assumes 16)")
    parser.add_argument("--img_size", type=number(int, 16), default=None,
                        help="input size S (default: the checkpoint's; a raw state_dict assumes 224)")
    parser.add_argument("--threads", type=number(int, 1), default=None,
                        help="torch CPU threads for the network (default: torch's choice)")
    parser.add_argument("--stats_json", default=None,
                        help="write the run's figures (counts, latencies) as JSON here at the end")
    return parser


def settings_from_args(args) -> StreamSettings:
    return StreamSettings(stride=args.stride, clip_sec=args.clip_sec, score_threshold=args.score_threshold,
                          events=args.events, tube_events=args.tube_events, tube_start_sec=args.tube_start_sec,
                          webhook=args.webhook, output=args.output,
                          show=args.show, reconnect=args.reconnect, reconnect_tries=args.reconnect_tries,
                          stall_sec=args.stall_sec, max_seconds=args.max_seconds, speed=args.speed)


def model_info(info: dict, num_frames=None, img_size=None, clip_sec=None) -> tuple[dict, float | None]:
    """``info`` with the --num_frames/--img_size overrides, and the clip length: --clip_sec, else a training
    window the checkpoint stores (``clip_sec`` or ``window_sec`` in its preprocessing), else None (T frames)."""
    info = dict(info)
    if num_frames:
        info["num_frames"] = num_frames
    if img_size:
        info["img_size"] = img_size
    return info, clip_sec or info.get("clip_sec") or info.get("window_sec")


@contextlib.contextmanager
def signals_stop(stop: StopFlag):
    """Ctrl-C and SIGTERM ask the run to stop (outputs closed, threads joined) instead of killing it."""
    def handler(signum, _frame):
        stop.set("interrupted" if signum == signal.SIGINT else "terminated")
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def summary(stats: StreamStats, settings: StreamSettings) -> None:
    lines = ["summary:",
             f"  end         : {stats.end}" + (f" ({stats.message})" if stats.message else ""),
             f"  frames      : {stats.frames} in {stats.seconds:.1f} s ({stats.dropped_frames} dropped, "
             f"stream time {stats.stream_sec:.1f} s, {stats.reconnects} reconnection(s))",
             f"  predictions : {stats.predictions} of {stats.clips} clips ({stats.skipped} skipped for newer ones); "
             f"latency median {stats.latency(0.5):.3f} s, p95 {stats.latency(0.95):.3f} s"]
    if settings.events:
        lines.append(f"  events      : {settings.events} ({stats.events_rows} rows)")
    if settings.tube_events:
        lines.append(f"  tube events : {settings.tube_events} ({stats.tube_events} rows)")
    if settings.output:
        lines.append(f"  annotated   : {settings.output}")
    log.info("\n".join(lines))


def main(args) -> int:
    setup_logging(to_stderr=args.tube_events == "-")
    check_output_folders(args)
    spec = parse_source(args.source, parse_options(args.source_option))
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype, note = autocast_settings(device, args.precision)
    net, info, _ = inference.load_model(args.model_path, device, args.class_names)
    info, settings.clip_sec = model_info(info, args.num_frames, args.img_size, args.clip_sec)
    log.info("%s on %s, %d torch thread(s); %d frames x %s px per clip", note, device, torch.get_num_threads(),
             info["num_frames"], info["img_size"])
    stop = StopFlag()
    with signals_stop(stop):
        stats = run_stream(spec, net, info, settings, device, dtype, stop)
    summary(stats, settings)
    if args.stats_json:
        write_text(args.stats_json, json.dumps(stats.as_dict(), indent=1) + "\n")
    if EXIT_CODES[stats.end] == 1:
        log.error("error: stream %s", stats.message or stats.end)
    return EXIT_CODES[stats.end]


def cli(argv=None) -> int:
    return run_cli(main, get_args_parser().parse_args(argv), errors=(SourceError, star_model.CheckpointError))


if __name__ == "__main__":
    sys.exit(cli())
