"""A video's detections and tubes once its clips are predicted: :class:`Detection` (the published rule applied to a
clip, :func:`detections_from_prediction`), :class:`VideoResult`, and the joining of windows: detections of one class
across windows into time spans (:func:`join_windows`), tube mode's tubes across windows (:func:`tube_linker`), both
applied by :func:`finish_video`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

import postprocess
import tubes
import video

if TYPE_CHECKING:
    from inference import Settings

JOIN_IOU = 0.3            # boxes of consecutive windows "overlap" when their IoU is at least this
MAX_GAP_SEC = 1.0         # a tube missing this long at most (a pause, a window's edge) keeps its id
# Tube mode: a joined tube shorter than this is dropped (ACT's tube builder: 15 frames, 0.6 s at 25 fps), so that one
# window's stray class on an actor does not outrank true tubes (docs/EXPERIMENTS.md, "Tube mode", ninth session).
MIN_TUBE_SEC = 0.6


@dataclasses.dataclass
class Detection:
    """One detection: class, score, normalised xyxy box and the time span it covers."""

    class_id: int
    class_name: str
    score: float
    box: tuple
    start_sec: float
    end_sec: float


def detections_from_prediction(pred: dict, class_names: Sequence[str], threshold: float,
                               start_sec: float, end_sec: float) -> list[Detection]:
    """The published rule (``postprocess.detections``) as ``Detection`` objects for a time span, best first."""
    return [Detection(label, class_names[label], score, tuple(box), float(start_sec), float(end_sec))
            for label, score, box in postprocess.detections(pred, threshold)]


def join_windows(detections: Iterable[Detection], iou_threshold: float = JOIN_IOU,
                 max_gap_sec: float = 0.0) -> list[Detection]:
    """Join detections of one class across windows into time spans.

    Windows are taken in start order; a detection joins a span of its class when its window
    starts after the span's latest window, no later than ``max_gap_sec`` after the span ends
    (overlapping or consecutive windows), and its box has IoU >= ``iou_threshold`` with the
    span's latest box (the best such span; each span takes at most one detection per window,
    the highest scoring first). A joined span has the earliest start, the latest end, the mean
    box and the highest score. Returns the spans sorted by start, then score (highest first).
    """
    eps = 1e-6
    by_window: dict[tuple, list[Detection]] = {}
    for d in detections:
        by_window.setdefault((d.start_sec, d.end_sec), []).append(d)
    spans: list[dict] = []
    for (start, _), dets in sorted(by_window.items()):
        taken: set[int] = set()
        for d in sorted(dets, key=lambda x: -x.score):
            best, best_iou = None, iou_threshold
            for k, s in enumerate(spans):
                if (k in taken or s["class_id"] != d.class_id or s["last_start"] >= start - eps
                        or start > s["end"] + max_gap_sec + eps):
                    continue
                iou = float(box_iou(torch.tensor([s["last_box"]]), torch.tensor([d.box]))[0, 0])
                if iou >= best_iou:
                    best, best_iou = k, iou
            if best is None:
                spans.append({"class_id": d.class_id, "name": d.class_name, "start": d.start_sec, "end": d.end_sec,
                              "boxes": [d.box], "score": d.score, "last_box": d.box, "last_start": start})
                taken.add(len(spans) - 1)
                continue
            s = spans[best]
            s["end"], s["score"] = max(s["end"], d.end_sec), max(s["score"], d.score)
            s["boxes"].append(d.box)
            s["last_box"], s["last_start"] = d.box, start
            taken.add(best)
    joined = [Detection(s["class_id"], s["name"], s["score"], tuple(float(v) for v in np.mean(s["boxes"], axis=0)),
                        s["start"], s["end"]) for s in spans]
    return sorted(joined, key=lambda d: (d.start_sec, -d.score))


@dataclasses.dataclass
class VideoResult:
    """What is known about one input video once all its clips went through the network."""

    index: int
    name: str
    path: str
    info: video.VideoInfo | None = None
    detections: list = dataclasses.field(default_factory=list)
    queries: list = dataclasses.field(default_factory=list)   # per clip prediction dicts (evaluation)
    best_score: float = 0.0
    clips: int = 0
    error: str | None = None
    spans: list = dataclasses.field(default_factory=list)     # per clip (start_sec, end_sec), as queries
    frame_indices: list = dataclasses.field(default_factory=list)   # per clip (T,) video frames, as queries
    frame_spans: list = dataclasses.field(default_factory=list)     # per clip [first, end) video frames
    tube_mode: bool = False                                          # the clips were predicted as tubes
    clip_tubes: list = dataclasses.field(default_factory=list)      # per clip [tubes.PredTube] (tube mode)
    tubes: list = dataclasses.field(default_factory=list)           # the video's tubes, numbered (tube_id order)


def tube_detection(tube: tubes.PredTube, fps: float) -> Detection:
    """A tube as one predictions.csv detection: its score, its box at its middle frame, its frames' time span."""
    return Detection(tube.class_id, tube.class_name, tube.score, tube.middle_box(), int(tube.frames[0]) / fps,
                     (int(tube.frames[-1]) + 1) / fps)


def finish_video(res: VideoResult, settings: "Settings") -> None:
    """Once all clips of a video are predicted: its tubes (joined across windows, numbered) and its detections
    (the predictions.csv rows, in tube_id order in tube mode). Tube mode: :func:`tube_linker`'s rules; clip mode:
    :func:`join_windows`, each detection a tube with a constant box over its span."""
    fps = res.info.fps
    between = settings.stride_sec - settings.window_sec if settings.window_sec else 0.0
    if res.tube_mode:
        res.tubes, res.clip_tubes = tube_linker(fps, between, res.info.num_frames).join(res.clip_tubes), []
        res.detections = [tube_detection(t, fps) for t in res.tubes]
        return
    if settings.window_sec:
        res.detections = join_windows(res.detections, JOIN_IOU, max_gap_sec=max(0.0, between))
    spans = [(d, span_frames(d.start_sec, d.end_sec, res.info)) for d in res.detections]
    res.tubes = tubes.number_tubes([tubes.constant_tube(d.class_id, d.class_name, d.score, d.box, frames)
                                    for d, frames in spans if len(frames)])


def tube_linker(fps: float, between_sec: float = 0.0, num_frames: int | None = None) -> tubes.TubeLinker:
    """Tube mode's joining rules at ``fps`` (test.py, stream.py and app.py): boxes overlapping by ``JOIN_IOU``, a gap of
    ``MAX_GAP_SEC`` (or ``between_sec``, the gap between windows, when longer) bridged, tubes under ``MIN_TUBE_SEC``
    (or the whole video of ``num_frames``, when shorter) dropped."""
    max_gap = video.seconds_to_frames(max(MAX_GAP_SEC, between_sec), fps)
    min_frames = video.seconds_to_frames(MIN_TUBE_SEC, fps)
    if num_frames is not None:
        min_frames = min(min_frames, max(1, num_frames))
    return tubes.TubeLinker(JOIN_IOU, max_gap, min_frames=min_frames)


def span_frames(start_sec: float, end_sec: float, info: video.VideoInfo) -> np.ndarray:
    """The video frames whose time ``frame / fps`` lies in ``[start_sec, end_sec)``."""
    first = max(0, math.ceil(start_sec * info.fps - 1e-6))
    last = min(info.num_frames, math.ceil(end_sec * info.fps - 1e-6))
    return np.arange(first, last, dtype=np.int64)
