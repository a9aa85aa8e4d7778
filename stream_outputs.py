"""What a stream writes and shows: the ``--events`` CSV (:class:`EventsWriter`), the annotated ``--output`` video
(:class:`AnnotatedWriter`; :class:`TubeVideoWriter` holds frames in a bounded buffer until the tube predictions cover
them), the ``--show`` window (:class:`Display`) and the live status line (:class:`StatusLine`)."""
from __future__ import annotations

import collections
import contextlib
import csv
import logging
import os
import pathlib
import sys
import time

import cv2
import numpy as np
from tqdm import tqdm

import drawing
import tube_events
import video_writer
from predictions_io import NO_OBJECT
from predictor import Prediction
from runtime import UsageError, one_line
from stream_state import StreamStats

log = logging.getLogger("star.stream")

EVENT_FIELDS = ("stream_time_sec", "wall_time", "latency_sec", "pred_class", "score", "x1", "y1", "x2", "y2",
                "clip_start_sec", "clip_end_sec")
ANNOTATE_BUFFER_BYTES = 512 * 2**20   # tube mode's --output: frames waiting for their predictions, at most
STATUS_EVERY_SEC = 1.0    # live status line refresh
STATUS_LOG_SEC = 10.0     # status as a log line when stderr is not a terminal


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
            self._row((*head, NO_OBJECT, f"{pred.best_score:.4f}", "", "", "", "", *tail))
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
            self._writer = video_writer.H264Writer(self.path, image.shape[1], image.shape[0], self.fps)
        self._writer.write(drawing.draw_detections(image, shown) if shown else image)

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
    """``[detections.Detection]`` as drawing.draw_detections takes them: ``(class_name, score, box)``."""
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
        """Show one frame with ``shown`` drawn (drawing.draw_detections' tuples); False when the user asked to stop (a
        normal end)."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(self.TITLE, cv2.cvtColor(drawing.draw_detections(image, shown), cv2.COLOR_RGB2BGR))
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
