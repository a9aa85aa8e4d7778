"""Live tubes: a stream's clip predictions joined into tubes as they arrive, and the events said about them.

:class:`LiveTubes` feeds each predicted clip to a :class:`tubes.TubeLinker` (test.py's joining rules, one code path)
and watches each actor's tubes as its parts so far make them (:meth:`tubes.TubeLinker.provisional_tubes`):

- ``start``: a tube spans ``start_frames`` frames (:data:`START_SEC` by default); it gets the next ``tube_id``.
- ``end``: the newest prediction is more than the joining gap past its last frame (the actor stopped acting or
  left), the actor's next tube has started (another action), its actor's parts no longer make it (relabelled), or
  the stream ends. A later window that still extends an ended tube changes nothing said.

Rows carry DESIGN.md's "Live tube events" columns (:data:`EVENT_FIELDS`); :class:`EventFile` writes them as CSV or
JSON lines, flushed per row. Frames are 0-based indices over the stream; boxes are normalised xyxy.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import json
import pathlib
import sys
import threading
import time
from typing import Sequence

import numpy as np

import tubes
from runtime import UsageError

EVENT_FIELDS = ("event", "tube_id", "pred_class", "score", "action_start_sec", "action_end_sec", "stream_time_sec",
                "wall_time", "latency_sec", "x1", "y1", "x2", "y2")
# A tube is said to start once it spans this long: twice test.py's shortest tube, since the model's false tubes are
# mostly shorter (docs/EXPERIMENTS.md, "Live tube events (stream.py --tube_events)").
START_SEC = 1.2
CLOCK_KEEP = 8192   # frame times kept for converting frame indices to stream seconds (minutes of video)


@dataclasses.dataclass
class TubeEvent:
    """One row of the events file (:data:`EVENT_FIELDS`); ``action_end_sec`` is None on a start row."""

    event: str
    tube_id: int
    pred_class: str
    score: float
    action_start_sec: float
    action_end_sec: float | None
    stream_time_sec: float
    wall_time: str
    latency_sec: float
    box: tuple

    def as_dict(self) -> dict:
        """The row as JSON (numbers rounded; ``action_end_sec`` null on a start row)."""
        x1, y1, x2, y2 = (round(min(max(float(v), 0.0), 1.0), 4) for v in self.box)
        end = None if self.action_end_sec is None else round(self.action_end_sec, 3)
        return {"event": self.event, "tube_id": self.tube_id, "pred_class": self.pred_class,
                "score": round(self.score, 4), "action_start_sec": round(self.action_start_sec, 3),
                "action_end_sec": end, "stream_time_sec": round(self.stream_time_sec, 3), "wall_time": self.wall_time,
                "latency_sec": round(self.latency_sec, 3), "x1": x1, "y1": y1, "x2": x2, "y2": y2}


class FrameClock:
    """Stream seconds of recent frame indices (as the reader stamped them); older or newer frames are
    extrapolated from the nearest kept one at ``fps``."""

    def __init__(self, fps: float, keep: int = CLOCK_KEEP):
        self.fps = float(fps)
        self._times: collections.deque = collections.deque(maxlen=keep)
        self._first = 0          # frame index of _times[0]
        self._lock = threading.Lock()

    def add(self, index: int, time_sec: float) -> None:
        """Record the stream time of frame ``index`` (consecutive indices, in order)."""
        with self._lock:
            if len(self._times) == self._times.maxlen:
                self._first += 1
            if not self._times:
                self._first = index
            self._times.append(float(time_sec))

    def time(self, index: int) -> float:
        """Stream seconds of frame ``index``: its recorded time, else extrapolated from the nearest kept one."""
        with self._lock:
            if not self._times:
                return index / self.fps
            k = min(max(index - self._first, 0), len(self._times) - 1)
            return self._times[k] + (index - self._first - k) / self.fps


@dataclasses.dataclass(eq=False)
class LiveTube:
    """A tube that has started: its id, its actor, its class and its newest shape (``piece``)."""

    tube_id: int
    actor_key: int
    piece: tubes.PredTube
    ended: bool = False

    @property
    def first(self) -> int:
        return int(self.piece.frames[0])

    @property
    def last(self) -> int:
        return int(self.piece.frames[-1])

    def drawn(self, i: int) -> tuple:
        """``(class_name, score, box, "#id")`` at the ``i``-th frame of its piece, as drawing.draw_detections takes it."""
        return (self.piece.class_name, float(self.piece.frame_scores[i]), tuple(self.piece.boxes[i]),
                f"#{self.tube_id}")


class LiveTubes:
    """Tubes and their start/end events on a stream, one predicted clip at a time (thread-safe: the predictor
    thread updates, the drawing thread reads).

    ``linker``: test.py's joining rules; ``start_frames``: frames a tube spans before its start is said;
    ``stride``: frames between the stream's clips (the next clip starts at least that much later: actors out of
    reach retire).
    """

    def __init__(self, linker: tubes.TubeLinker, clock: FrameClock, start_frames: int, stride: int):
        self.linker, self.clock = linker, clock
        self.start_frames, self.stride = int(start_frames), int(stride)
        self.tubes: list[LiveTube] = []      # started tubes still to draw (open, or ended not long ago)
        self._by_actor: dict[int, list[LiveTube]] = {}   # every started tube of each open actor: pieces it claimed
        self.covered = 0                     # frames [0, covered) have been predicted
        self.final: list[tubes.PredTube] | None = None   # test.py's tubes, once finished
        self._ids = 0
        self._lock = threading.Lock()

    def update(self, clip: Sequence[tubes.PredTube], span: tuple[int, int], arrival: float) -> list[TubeEvent]:
        """Link one clip's tubes (``span = [first, end)`` of the stream's frames; ``arrival``: monotonic arrival of
        its newest frame) and return the events this decides."""
        next_first = int(span[0]) + self.stride
        with self._lock:
            retired = self.linker.add(clip, next_first)
            self.covered = max(self.covered, int(span[1]))
            newest = int(span[1]) - 1
            now = (newest, arrival)
            events = []
            for actor in retired:
                events += self._follow(actor, self.linker.provisional_tubes(actor), now, lambda _: True)
                self._by_actor.pop(actor.key, None)
            for actor in self.linker.open:
                events += self._follow(actor, self.linker.provisional_tubes(actor), now,
                                       lambda t: t.last < newest - self.linker.max_gap)
            return events

    def finish(self, newest: int, arrival: float) -> list[TubeEvent]:
        """The stream ended after frame ``newest``: every open tube ends; :attr:`final` holds test.py's tubes."""
        with self._lock:
            events = []
            for actor in self.linker.open:   # a retired actor's tubes ended when it retired
                events += self._follow(actor, self.linker.provisional_tubes(actor), (newest, arrival), lambda _: True)
            self.final = self.linker.finish()
            return events

    def _follow(self, actor: tubes.Actor, pieces: list[tubes.PredTube], now, is_done) -> list[TubeEvent]:
        """Match ``actor``'s started tubes to its ``pieces`` (an ended tube keeps its piece from starting again);
        start the other pieces that are long enough; end what is done."""
        mine = self._by_actor.setdefault(actor.key, [])
        used: set[int] = set()
        events = []
        for live in sorted(mine, key=lambda t: t.ended):   # open tubes choose first
            k = self._match(live, pieces, used)
            if k is not None and live.ended and pieces[k].frames[-1] > live.last + self.linker.max_gap:
                k = None   # the actor acts again after the end was said: a new tube
            if k is not None:
                used.add(k)
                if not live.ended:
                    live.piece = pieces[k]
            elif not live.ended:   # its parts no longer make this tube (relabelled): it ends as last seen
                events.append(self._event("end", live, now))
        for k, piece in enumerate(pieces):
            if k not in used and piece.frames[-1] - piece.frames[0] + 1 >= self.start_frames:
                self._ids += 1
                live = LiveTube(self._ids, actor.key, piece)
                mine.append(live)
                self.tubes.append(live)
                events.append(self._event("start", live, now))
        newest_start = max((t.first for t in mine if not t.ended), default=None)
        for live in mine:
            if not live.ended and (is_done(live) or live.first < newest_start):
                events.append(self._event("end", live, now))
        return events

    def _match(self, live: LiveTube, pieces: list[tubes.PredTube], used: set[int]) -> int | None:
        """The index of the unused piece of ``live``'s class sharing most frames with it (or within the joining
        gap of it), else None."""
        gap = self.linker.max_gap + 1
        best, best_shared = None, -1
        for k, piece in enumerate(pieces):
            if k in used or piece.class_id != live.piece.class_id:
                continue
            if piece.frames[0] > live.last + gap or piece.frames[-1] < live.first - gap:
                continue
            shared = len(np.intersect1d(piece.frames, live.piece.frames, assume_unique=True))
            if shared > best_shared:
                best, best_shared = k, shared
        return best

    def _event(self, kind: str, live: LiveTube, now) -> TubeEvent:
        newest, arrival = now
        piece = live.piece
        if kind == "end":
            live.ended = True
        fps = self.clock.fps
        end = self.clock.time(live.last) + 1.0 / fps if kind == "end" else None
        return TubeEvent(kind, live.tube_id, piece.class_name, float(piece.score), self.clock.time(live.first), end,
                         self.clock.time(newest), wall_time(), max(0.0, time.monotonic() - arrival),
                         tuple(float(v) for v in piece.boxes[-1]))

    def boxes_at(self, frame: int) -> list[tuple]:
        """``(class_name, score, box, "#id")`` of every started tube present at ``frame`` (its predicted, interpolated
        box there), for drawing."""
        with self._lock:
            out = []
            for live in self.tubes:
                i = int(np.searchsorted(live.piece.frames, frame))
                if i < len(live.piece.frames) and live.piece.frames[i] == frame:
                    out.append(live.drawn(i))
            return out

    def latest_boxes(self) -> list[tuple]:
        """``(class_name, score, box, "#id")`` of every open tube at its newest predicted frame (a live view)."""
        with self._lock:
            return [t.drawn(-1) for t in self.tubes if not t.ended]

    def forget_before(self, frame: int) -> None:
        """Drop ended tubes whose last frame is before ``frame`` (drawn already): memory stays bounded."""
        with self._lock:
            self.tubes = [t for t in self.tubes if not (t.ended and t.last < frame)]


def wall_time() -> str:
    """Now as ISO 8601 UTC with milliseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventFile:
    """``--tube_events``: a CSV file (:data:`EVENT_FIELDS`), or JSON lines on stdout for ``-``; flushed per row so a
    reader, or a crash, sees every event said so far."""

    def __init__(self, path: str):
        self.path = path
        if path == "-":
            self._file, self._csv = sys.stdout, None
            return
        try:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", newline="", encoding="utf-8")   # noqa: SIM115 (closed in close())
        except OSError as err:
            raise UsageError(f"--tube_events {path}: cannot write ({err.strerror or err})") from None
        self._csv = csv.DictWriter(self._file, fieldnames=EVENT_FIELDS)
        self._csv.writeheader()
        self._file.flush()

    def write(self, event: TubeEvent) -> None:
        """Append one event row and flush it."""
        row = event.as_dict()
        if self._csv is None:
            self._file.write(json.dumps(row) + "\n")
        else:
            self._csv.writerow({k: "" if v is None else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._file.close()
