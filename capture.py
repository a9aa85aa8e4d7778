"""A source's frames on their way to the network: :class:`FrameReader` is the thread that reads a source into a bounded
queue (a file on its frame clock, a live source reopened with back-off), and :class:`FrameRing` is the ring buffer of
the last clip window at the model's size, from which each :class:`ClipJob` is cut."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time

import av
import cv2
import numpy as np

import video
from runtime import one_line
from sources import READ_ERRORS, SourceError, SourceSpec, Stalled, open_source
from stream_state import StreamSettings, StreamStats

log = logging.getLogger("star.stream")

MAX_BACKOFF_SEC = 30.0


@dataclasses.dataclass
class Frame:
    """One decoded frame: RGB image, stream time (s), arrival (``time.monotonic``)."""

    image: np.ndarray
    time_sec: float
    arrival: float


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
