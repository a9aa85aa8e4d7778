"""A stream run's shared state: :class:`StreamSettings` (how a stream is cut, predicted and written, checked once),
:class:`StreamStats` (what happened, each counter written by one thread) and :class:`StopFlag` (the first reason to
stop wins)."""
from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

import tube_events
import webhook
from runtime import UsageError

TUBE_START_SEC = tube_events.START_SEC
LATENCY_KEEP = 100_000    # latencies kept for the percentiles (bounded: hours of predictions)


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
    """What happened; each counter is written by one thread only. ``end`` is a key of ``stream.EXIT_CODES``."""

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
