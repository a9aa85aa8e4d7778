"""Windows and targets: the window of frames a clip spans (training, validation and inference windows), the ground
truth tubes at a clip's frames, and the training target built from them (boxes normalised cxcywh).
"""
from __future__ import annotations

import math

import numpy as np
import torch

import video
from records import VideoRecord

NEGATIVE_PROB = 0.2   # default share of training windows placed away from every track


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) cxcywh (same units)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] + wh / 2, wh], axis=1)


def window_length(record: VideoRecord, window_frames: int | None = None, window_sec: float | None = None,
                  num_frames: int | None = None) -> int:
    """Frames one clip of ``record`` spans: ``window_frames``, else ``window_sec`` at the video's rate
    (cut as :func:`video.window_spans` cuts test.py's windows), else the whole video; at most the
    video (``num_frames``: its length when known better than the record's)."""
    n = int(num_frames or record.num_frames)
    if window_frames is not None:
        win = int(window_frames)
    elif window_sec is not None:
        win = video.seconds_to_frames(window_sec, record.fps)
    else:
        win = n
    if win < 1:
        raise ValueError(f"a window must span at least one frame, got {win}")
    return min(win, n)


def track_spans(record: VideoRecord, num_frames: int | None = None) -> list[tuple[int, int]]:
    """Sorted, merged inclusive frame spans ``(first, last)`` where any track of ``record`` is
    present (inside the first ``num_frames`` frames); [] for a record without tracks."""
    n = int(num_frames or record.num_frames)
    merged: list[list[int]] = []
    for a, b in sorted(span for t in record.tracks or () for span in t.segments()):
        if a >= n:
            continue
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], min(b, n - 1))
        else:
            merged.append([a, min(b, n - 1)])
    return [(a, b) for a, b in merged]


def _free_starts(spans, n: int, win: int) -> list[tuple[int, int]]:
    """Inclusive ranges of window starts whose ``win`` frames hold no frame of ``spans``."""
    free, lo = [], 0
    for a, b in spans:
        hi = min(a - win, n - win)
        if hi >= lo:
            free.append((lo, hi))
        lo = max(lo, b + 1)
    if lo <= n - win:
        free.append((lo, n - win))
    return free


def _uniform_in(ranges, rng: np.random.Generator) -> int:
    """A value drawn uniformly from the union of inclusive integer ``ranges``."""
    sizes = np.array([b - a + 1 for a, b in ranges])
    k = int(rng.integers(sizes.sum()))
    which = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
    return int(ranges[which][0] + k - (sizes[:which].sum() if which else 0))


def training_window(record: VideoRecord, win: int, rng: np.random.Generator, negative_prob: float = NEGATIVE_PROB,
                    num_frames: int | None = None) -> tuple[int, int]:
    """A random window ``[start, end)`` of ``win`` frames for training.

    With probability ``negative_prob`` (when the video has such places) it holds no track frame:
    uniform over those starts; otherwise it holds a frame drawn uniformly from the frames where a
    track is present, at a uniform place in the window. A video without tracks: uniform."""
    n = int(num_frames or record.num_frames)
    win = min(win, n)
    if win >= n:
        return 0, n
    spans = track_spans(record, n)
    free = _free_starts(spans, n, win)
    if spans and not (free and rng.random() < negative_prob):
        frame = _uniform_in(spans, rng)
        start = int(np.clip(frame - rng.integers(0, win), 0, n - win))  # the window holds `frame`
    else:
        start = _uniform_in(free or [(0, n - win)], rng)
    return start, start + win


def validation_window(record: VideoRecord, win: int, num_frames: int | None = None) -> tuple[int, int]:
    """The deterministic window ``[start, end)``: centred on the middle of the tracks' extent
    (first to last frame where any track is present), or of the video without tracks."""
    n = int(num_frames or record.num_frames)
    win = min(win, n)
    spans = track_spans(record, n)
    first, last = (spans[0][0], spans[-1][1]) if spans else (0, n - 1)
    start = int(np.clip(math.floor((first + last + 1 - win) / 2 + 0.5), 0, n - win))
    return start, start + win


def video_windows(record: VideoRecord, T: int, window_frames: int, stride_frames: int | None = None
                  ) -> list[tuple[int, int, np.ndarray]]:
    """Every window of a video, as inference cuts them: ``(start, end, indices (T,) int64)``.

    Spans are :func:`video.window_spans_frames` (``stride_frames`` default: the window, so
    windows tile the video and the last one ends at its last frame); the T frames of a window
    are ``start + video.sample_indices(end - start, T)``, the frames :func:`video.iter_windows`
    decodes. With ``window_frames = video.seconds_to_frames(window_sec, fps)`` (and the stride
    alike) these are test.py's windows."""
    win = window_length(record, window_frames)
    stride = int(stride_frames or win)
    spans = video.window_spans_frames(record.num_frames, win, stride)
    return [(s, e, (s + video.sample_indices(e - s, T)).astype(np.int64)) for s, e in spans]


def clip_tubes(record: VideoRecord, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ground truth at a clip's frames ``indices`` (T,): one row per (track, class) acting in at
    least one of them (a track doing two actions has two rows).

    Returns ``track_ids`` int64 (M,), ``classes`` int64 (M,), ``acting`` bool (M, T) and
    ``boxes`` float32 (M, T, 4) normalised xyxy (zeros where not acting). A 5-field record: one
    row per instance (track id = its index), acting at every step with its box."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    T = len(idx)
    if record.tracks is None:
        n = len(record.labels)
        return (np.arange(n, dtype=np.int64), np.asarray(record.labels, np.int64).reshape(-1),
                np.ones((n, T), bool), np.repeat(record.boxes[:, None].astype(np.float32), T, axis=1))
    rows = []
    for track in record.tracks:
        present, boxes, labels = track.at(idx)
        for c in sorted({c for ids in labels for c in ids}):
            acting = np.array([c in ids for ids in labels], bool)
            rows.append((track.track_id, c, acting, np.where(acting[:, None], boxes, 0.0).astype(np.float32)))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, T), bool), np.zeros((0, T, 4), np.float32)
    ids, classes, acting, boxes = zip(*rows)
    return np.array(ids, np.int64), np.array(classes, np.int64), np.stack(acting), np.stack(boxes)


def tube_target(video_name: str, indices, track_ids, classes, acting, boxes) -> dict:
    """The training target from :func:`clip_tubes`' arrays (boxes normalised xyxy, maybe augmented).

    ``labels`` (N,) and ``boxes`` (N, 4) cxcywh: the rows acting at the middle step ``T // 2``;
    ``track_ids`` (M,), ``track_labels`` (M, T) int64 (class or -1), ``track_boxes`` (M, T, 4)
    cxcywh (zeros where -1), ``frame_indices`` (T,) int64, ``video``. See :class:`ActionDataset`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    acting = np.asarray(acting, bool).reshape(len(classes), len(idx))
    boxes = np.asarray(boxes, np.float32).reshape(len(classes), len(idx), 4)
    at_mid = acting[:, len(idx) // 2]
    track_boxes = xyxy_to_cxcywh(boxes.reshape(-1, 4)).reshape(boxes.shape)
    track_boxes[~acting] = 0.0
    return {"labels": torch.from_numpy(classes[at_mid]),
            "boxes": torch.from_numpy(xyxy_to_cxcywh(boxes[at_mid, len(idx) // 2])),
            "video": video_name,
            "track_ids": torch.from_numpy(np.asarray(track_ids, np.int64).reshape(-1)),
            "track_labels": torch.from_numpy(np.where(acting, classes[:, None], -1).astype(np.int64)),
            "track_boxes": torch.from_numpy(np.ascontiguousarray(track_boxes)),
            "frame_indices": torch.from_numpy(idx)}


def clip_target(record: VideoRecord, indices) -> dict:
    """The unaugmented target of ``record`` at frames ``indices`` (T,), as :class:`ActionDataset`
    gives it (for evaluating windows, e.g. those of :func:`video_windows`)."""
    return tube_target(record.video, indices, *clip_tubes(record, indices))
