"""STAR's prediction pipeline, shared by test.py (a folder of videos), stream.py and app.py.

Pipeline: the checkpoint is loaded once; decoding and preprocessing run in background processes (a
``DataLoader`` over a :class:`ClipStream`) while the network runs batches under ``torch.inference_mode``
(fp16 autocast on CUDA, bf16 on CPUs with native bf16); annotated videos are written by a background
thread in a second sequential pass over each input once its predictions are known, so no whole video is
ever held in memory. A video that cannot be read is an item with an error, never an exception.

A query is a detection when its best foreground probability (softmax over all C+1 logits) is at least the
score threshold (the published rule). Without windows each video is one clip of T uniformly sampled frames
(the published behaviour); with ``window_sec`` windows every ``stride_sec`` are predicted separately and
detections of one class with overlapping boxes in overlapping or consecutive windows are joined into one
time span (:func:`join_windows`).

Every video's detections are also tubes (``tubes.py``), written one row per tube per frame to
``<output stem>_frames.csv`` and drawn frame by frame with their ``#id``: a tube-mode checkpoint
(``model_args["tube_steps"] > 0``) predicts a box per sampled frame, interpolated to every frame and joined
across windows (:class:`tubes.TubeLinker`, which then replaces :func:`join_windows`: predictions.csv gets one
row per joined tube); a clip-mode checkpoint's joined detections are tubes with one constant box.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import threading
import time
from typing import Iterable, Iterator, Sequence

import av
import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

import backend
import metrics
import postprocess
import tube_metrics
import tubes
import video
from files import atomic_write, write_text
from runtime import UsageError, autocast, one_line

log = logging.getLogger("star.inference")

NO_OBJECT = postprocess.NO_OBJECT_NAME
CSV_FIELDS = ("video_name", "pred_class", "score", "x1", "y1", "x2", "y2", "start_sec", "end_sec")
JOIN_IOU = 0.3            # boxes of consecutive windows "overlap" when their IoU is at least this
MAX_GAP_SEC = 1.0         # a tube missing this long at most (a pause, a window's edge) keeps its id
# Tube mode: a joined tube shorter than this is dropped (ACT's tube builder: 15 frames, 0.6 s at 25 fps), so that one
# window's stray class on an actor does not outrank true tubes (docs/EXPERIMENTS.md, "Tube mode", ninth session).
MIN_TUBE_SEC = 0.6
FRAME_FIELDS = ("video_name", "tube_id", "frame", "time_sec", "pred_class", "score", "x1", "y1", "x2", "y2")
PARTIAL_SUFFIX = ".partial.mp4"   # an annotated video being written (hidden, renamed when complete)
PROGRESS_LOG_SEC = 60.0           # a progress line (done, failed, ETA) goes to the log this often
# What a decoding worker may meet in an odd file besides VideoError (PyAV/FFmpeg, numpy, cv2).
DECODE_ERRORS = (video.VideoError, av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError)


def release_free_memory() -> None:
    """Give memory freed by the C allocator back to the system (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------- inputs


def list_videos(input_path, recursive: bool = False, exclude=None) -> list[pathlib.Path]:
    """The videos to predict, in sorted order: ``input_path`` itself when it is a file or a folder of numbered
    frames, else the files in it (and its sub-folders with ``recursive``) whose suffix is a video extension in
    any letter case, and the folders of numbered frames. Hidden files and folders and anything under
    ``exclude`` are left out."""
    root = pathlib.Path(input_path)
    if root.is_file() or video.is_frame_folder(root):
        return [root]
    if not root.exists():
        raise UsageError(f"--input_dir {root}: no such file or folder")
    if not root.is_dir():
        raise UsageError(f"--input_dir {root}: not a folder or a video file")
    excluded = pathlib.Path(exclude).resolve() if exclude else None
    pattern = root.rglob("*") if recursive else root.iterdir()
    found = []
    try:
        for path in pattern:
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if excluded is not None and (path.resolve() == excluded or excluded in path.resolve().parents):
                continue
            if (path.is_file() and video.is_video_file(path.name)) or video.is_frame_folder(path):
                found.append(path)
    except PermissionError as err:
        raise UsageError(f"--input_dir {root}: cannot be read ({err.strerror})") from None
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def video_names(videos: Sequence[pathlib.Path], input_path) -> list[str]:
    """CSV names: the path relative to the input folder (the file name when flat)."""
    root = pathlib.Path(input_path)
    if root.is_file() or video.is_frame_folder(root):
        return [videos[0].name] if videos else []
    return [v.relative_to(root).as_posix() for v in videos]


def annotated_paths(names: Sequence[str], annotated_dir) -> list[pathlib.Path]:
    """``<annotated_dir>/<relative folder>/<stem>.mp4``; when two inputs share a stem (``a.mp4``,
    ``a.avi``) both keep their extension in the name (``a_mp4.mp4``, ``a_avi.mp4``)."""
    base = pathlib.Path(annotated_dir)
    stems = [pathlib.PurePosixPath(n).with_suffix("").as_posix().lower() for n in names]
    out = []
    for name, stem in zip(names, stems):
        p = pathlib.PurePosixPath(name)
        file = p.stem if stems.count(stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
        out.append(base.joinpath(*p.parent.parts, file + ".mp4"))
    return out


# --------------------------------------------------------------------------- clip stream


@dataclasses.dataclass
class ClipItem:
    """One unit travelling from a decoding worker to the network.

    ``clip`` (T, 3, S, S) float32 for a clip; None for the end-of-video marker or a failure.
    ``error``: one-line reason when the video failed. ``done``: the video has no more items.
    ``frame_indices`` (T,) int64: the video frame (0-based) each of the clip's frames is; ``frame_span``:
    the video frames ``[first, end)`` the clip covers.
    """

    index: int
    clip: torch.Tensor | None = None
    start_sec: float = 0.0
    end_sec: float = 0.0
    info: video.VideoInfo | None = None
    error: str | None = None
    done: bool = False
    carried: bool = False   # the clip was moved into the batch tensor by collate_items
    frame_indices: np.ndarray | None = None
    frame_span: tuple = (0, 0)

    @property
    def has_clip(self) -> bool:
        return self.clip is not None or self.carried


class ClipStream(torch.utils.data.IterableDataset):
    """Clips of a list of videos, decoded sequentially; each DataLoader worker takes every
    ``num_workers``-th video. Failures are items (``error`` set), never exceptions, so one bad
    file is reported and the others go on."""

    def __init__(self, videos: Sequence, num_frames: int, img_size, mean, std,
                 window_sec: float | None = None, stride_sec: float | None = None,
                 folder_fps: float = video.DEFAULT_FOLDER_FPS):
        self.videos = [os.fspath(v) for v in videos]
        self.folder_fps = folder_fps
        self.num_frames, self.img_size = int(num_frames), img_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.window_sec, self.stride_sec = window_sec, stride_sec

    def __iter__(self) -> Iterator[ClipItem]:
        worker = torch.utils.data.get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index in range(wid, len(self.videos), nworkers):
            yield from self.clips(index)

    def clips(self, index: int) -> Iterator[ClipItem]:
        path = self.videos[index]
        try:
            if self.window_sec is None:
                frames, info = video.sample_clip(path, self.num_frames, fps=self.folder_fps)
                yield ClipItem(index, self._prep(frames), 0.0, info.duration_sec, info, done=True,
                               frame_indices=video.sample_indices(info.num_frames, self.num_frames),
                               frame_span=(0, info.num_frames))
                return
            info = video.probe_video(path, fps=self.folder_fps)
            if info.num_frames == 0:
                raise video.VideoError(f"{path}: zero frames")
            spans = video.window_spans(info.num_frames, info.fps, self.window_sec, self.stride_sec)
            windows = video.iter_windows(path, self.num_frames, self.window_sec, self.stride_sec, info=info,
                                         fps=self.folder_fps)
            for (first, end_frame), (frames, start, end) in zip(spans, windows):   # both in window order
                stop = min(end_frame, round(end * info.fps))   # a stream shorter than probed ends early
                indices = np.minimum(first + video.sample_indices(end_frame - first, self.num_frames), stop - 1)
                yield ClipItem(index, self._prep(frames), start, end, info, frame_indices=indices,
                               frame_span=(first, stop))
            yield ClipItem(index, None, info=info, done=True)
        except DECODE_ERRORS as err:
            yield ClipItem(index, error=one_line(err, path), done=True)

    def _prep(self, frames) -> torch.Tensor:
        return video.preprocess(frames, self.img_size, self.mean, self.std)


@dataclasses.dataclass
class Batch:
    clips: torch.Tensor | None     # (B, T, 3, S, S) of the items that carry a clip, in order
    items: list                    # every ClipItem of the batch, clips removed


def collate_items(items: list) -> Batch:
    clips = [it.clip for it in items if it.clip is not None]
    for it in items:   # the tensors travel once, stacked in `clips`
        it.carried, it.clip = it.clip is not None, None
    return Batch(torch.stack(clips) if clips else None, items)


def _worker_init(_worker_id: int) -> None:
    """Decoding workers: one thread each for OpenCV and torch (the network needs the cores)."""
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(stream: ClipStream, batch_size: int, workers: int, pin_memory: bool = False):
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 2, "worker_init_fn": _worker_init, "persistent_workers": False}
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate_items, pin_memory=pin_memory, **kwargs)


# --------------------------------------------------------------------------- detections


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


def csv_rows(result: VideoResult) -> list[dict]:
    """The CSV rows of one predicted video; a ``no_object`` row (empty box, best score seen,
    the whole video's span) when nothing passed the threshold."""
    if not result.detections:
        duration = result.info.duration_sec if result.info else 0.0
        return [{"video_name": result.name, "pred_class": NO_OBJECT, "score": f"{result.best_score:.4f}",
                 "x1": "", "y1": "", "x2": "", "y2": "", "start_sec": "0.000", "end_sec": f"{duration:.3f}"}]
    return [{"video_name": result.name, "pred_class": d.class_name, "score": f"{d.score:.4f}",
             **{k: f"{min(max(v, 0.0), 1.0):.4f}" for k, v in zip(("x1", "y1", "x2", "y2"), d.box)},
             "start_sec": f"{d.start_sec:.3f}", "end_sec": f"{d.end_sec:.3f}"} for d in result.detections]


def write_predictions(rows: Iterable[dict], path) -> None:
    """Write a predictions CSV (``CSV_FIELDS``, rows from :func:`csv_rows`) atomically."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


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


def frames_csv_path(output_file) -> pathlib.Path:
    """Where the per-frame tubes go: ``X.csv`` -> ``X_frames.csv`` beside it."""
    out = pathlib.Path(output_file)
    return out.with_name(f"{out.stem}_frames{out.suffix}")


def frame_rows(result: VideoResult) -> Iterator[dict]:
    """The ``FRAME_FIELDS`` rows of one predicted video: per tube (tube_id order), one per frame where it is present,
    with its box and (interpolated) score at that frame."""
    fps = result.info.fps if result.info else 1.0
    for t in result.tubes:
        for frame, score, box in zip(t.frames.tolist(), t.frame_scores.tolist(), t.boxes.tolist()):
            yield {"video_name": result.name, "tube_id": t.tube_id, "frame": frame, "time_sec": f"{frame / fps:.3f}",
                   "pred_class": t.class_name, "score": f"{score:.4f}",
                   **{k: f"{min(max(v, 0.0), 1.0):.4f}" for k, v in zip(("x1", "y1", "x2", "y2"), box)}}


def write_frame_predictions(rows: Iterable[dict], path) -> int:
    """Write the per-frame tubes CSV (``FRAME_FIELDS``, rows from :func:`frame_rows`) atomically; returns the rows."""
    count = 0
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRAME_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


# --------------------------------------------------------------------------- annotation


def annotate_video(src, dst, video_tubes: Sequence[tubes.PredTube], info: video.VideoInfo) -> int:
    """Write ``dst`` (H.264 MP4): every frame of ``src`` at its size and rate, each tube's box of that frame drawn
    with its class, score at that frame and ``#tube_id`` (:attr:`VideoResult.tubes`). One sequential pass;
    returns the frames written."""
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}{PARTIAL_SUFFIX}")   # renamed to dst once complete
    by_frame: dict[int, list] = {}
    for t in video_tubes:
        for frame, score, box in zip(t.frames.tolist(), t.frame_scores.tolist(), t.boxes.tolist()):
            by_frame.setdefault(frame, []).append((t.class_name, score, box, f"#{t.tube_id}"))
    count = 0
    try:
        writer = None
        for i, frame in enumerate(video.iter_frames(src)):
            if writer is None:   # the decoded size wins over the container's
                writer = video.H264Writer(tmp, frame.shape[1], frame.shape[0], info.fps)
            shown = by_frame.get(i)
            writer.write(video.draw_detections(frame, shown) if shown else frame)
            count += 1
        if writer is None:
            raise video.VideoError(f"{src}: zero frames")
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return count


def remove_partial_annotations(annotated_dir) -> int:
    """Remove the half-written annotated videos a killed run left (:func:`annotate_video`'s temporary names); returns
    how many. Called before any video of a new run is annotated."""
    count = 0
    for path in pathlib.Path(annotated_dir).rglob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            count += 1
    return count


# --------------------------------------------------------------------------- evaluation


def model_index_of_dataset_classes(class_map, model_names: Sequence[str], raw_ids=None) -> list[int]:
    """For each dataset class (contiguous id), the model's class id. By the checkpoint's raw ids when
    it stores them, else by name, else by position when the counts match; UsageError otherwise."""
    if raw_ids:
        lookup = {int(r): i for i, r in enumerate(raw_ids)}
        if all(int(r) in lookup for r in class_map.raw_ids):
            return [lookup[int(r)] for r in class_map.raw_ids]
    if all(n in model_names for n in class_map.names):
        return [list(model_names).index(n) for n in class_map.names]
    if len(class_map) == len(model_names):
        log.warning("--labels: dataset classes %s matched to the model's %s by position",
                    class_map.names, list(model_names))
        return list(range(len(class_map)))
    raise UsageError(f"--labels: the dataset's classes {class_map.names} do not match the model's "
                     f"{list(model_names)}")


def video_level_prediction(queries: Sequence[dict]) -> dict:
    """All queries of all clips of a video as one prediction (one clip = the published case)."""
    return {k: torch.cat([q[k] for q in queries]) for k in ("scores", "labels", "boxes")}


def load_labels(labels_dir, model_names, raw_ids=None, folder_fps: float = video.DEFAULT_FOLDER_FPS
                ) -> tuple[list, list[int]]:
    """The dataset's records and, per dataset class, the model's class id (checked before inference)."""
    from problems import DatasetError, format_problems
    from records import load_dataset
    try:
        records, class_map, problems = load_dataset(labels_dir, fps=folder_fps)
    except DatasetError as err:
        raise UsageError(f"--labels {labels_dir}: {one_line(err)}") from None
    if problems:
        log.warning("--labels: %d problem(s) in the dataset:\n%s", len(problems), format_problems(problems))
    return records, model_index_of_dataset_classes(class_map, model_names, raw_ids)


def evaluate_predictions(results: Sequence[VideoResult], labels_dir, model_names, raw_ids, threshold,
                         output_file, labels=None) -> dict | None:
    """Score the predicted videos that the dataset labels; print and save the report
    (``<output stem>_metrics.json`` and ``.txt`` beside the output file)."""
    records, to_model = labels or load_labels(labels_dir, model_names, raw_ids)
    by_path = {os.path.realpath(r.path): r for r in records}
    preds, targets = [], []
    for res in results:
        record = by_path.get(os.path.realpath(res.path))
        if record is None or res.error or not res.queries:
            continue
        preds.append(video_level_prediction(res.queries))
        targets.append({"labels": torch.tensor([to_model[c] for c in record.labels], dtype=torch.int64),
                        "boxes": torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)})
    if not preds:
        log.error("--labels: none of the predicted videos is in %s; nothing to score", labels_dir)
        return None
    unlabelled = sum(1 for r in results if not r.error) - len(preds)
    result = metrics.evaluate(preds, targets, list(model_names), threshold)
    if any(r.per_frame for r in records):
        result.update(score_tubes(results, by_path, to_model, list(model_names), threshold))
    report = metrics.format_report(result, list(model_names))
    log.info("evaluation against %s (%d video(s) scored, %d predicted video(s) not in the dataset):\n%s",
             labels_dir, len(preds), unlabelled, report)
    out = pathlib.Path(output_file)
    json_path, text_path = out.with_name(out.stem + "_metrics.json"), out.with_name(out.stem + "_metrics.txt")
    write_text(json_path, json.dumps(result, indent=2, default=_json_default) + "\n")
    write_text(text_path, report + "\n")
    log.info("evaluation saved to %s and %s", json_path, text_path)
    return result


def span_frames(start_sec: float, end_sec: float, info: video.VideoInfo) -> np.ndarray:
    """The video frames whose time ``frame / fps`` lies in ``[start_sec, end_sec)``."""
    first = max(0, math.ceil(start_sec * info.fps - 1e-6))
    last = min(info.num_frames, math.ceil(end_sec * info.fps - 1e-6))
    return np.arange(first, last, dtype=np.int64)


def add_tube_predictions(scorer: tube_metrics.TubeScorer, res: VideoResult, width: int, height: int,
                         threshold: float) -> None:
    """A tube-mode video into ``scorer``: for frame-mAP every query as a detection of every class at each frame
    (:func:`tubes.class_detections`), with its interpolated box and that class's step probability (all queries,
    thresholded or not: recall counts in AP), from the one clip whose span's centre is nearest that frame
    (overlapping windows would otherwise detect each frame twice); for video-mAP the video's joined tubes
    (:attr:`VideoResult.tubes`). Boxes in pixels."""
    centres = np.array([(a + b - 1) / 2 for a, b in res.frame_spans], dtype=float)
    for clip, (pred, indices, span) in enumerate(zip(res.queries, res.frame_indices, res.frame_spans)):
        for view in tubes.class_detections(pred, threshold):
            frames, scores, boxes = tubes.dense(view, indices, span)
            own = np.abs(frames[:, None] - centres[None]).argmin(1) == clip       # first of equally near clips
            for label, q_scores, q_boxes in zip(view["labels"].tolist(), scores[:, own], boxes[:, own]):
                scorer.add_frame_detections(res.name, label, frames[own], q_scores, q_boxes, width, height)
    for t in res.tubes:
        scorer.add_tube(res.name, t.class_id, t.score, t.frames, t.boxes, width, height)


def score_tubes(results: Sequence[VideoResult], records_by_path: dict, to_model: Sequence[int],
                class_names: Sequence[str], threshold: float) -> dict:
    """frame-mAP and video-mAP (and per class: :meth:`tube_metrics.TubeScorer.result`) of whole videos against per-frame
    labels. Tube mode: :func:`add_tube_predictions`.
    Clip mode: frames: every query of every clip stands at each frame of its clip's span (one box per clip); tubes:
    the video's detections as written to predictions.csv (windows joined, above the threshold). The labels' tracks,
    interpolated as in training, are the ground truth."""
    scorer = tube_metrics.TubeScorer(len(class_names))
    for res in results:
        record = records_by_path.get(os.path.realpath(res.path))
        if record is None or res.error or not res.queries or not record.per_frame:
            continue
        if res.tube_mode:
            add_tube_predictions(scorer, res, record.width, record.height, threshold)
        else:
            for pred, (start, end) in zip(res.queries, res.spans):
                scorer.add_clip_predictions(res.name, span_frames(start, end, res.info), pred, record.width,
                                            record.height, as_tube=False)
            for d in res.detections:
                scorer.add_prediction(res.name, span_frames(d.start_sec, d.end_sec, res.info), d.class_id, d.score,
                                      d.box, record.width, record.height, as_frames=False)
        for track in record.tracks:
            frames, boxes, labels = track.dense()
            for c in sorted({c for ids in labels for c in ids}):
                acting = np.array([c in ids for ids in labels], bool)
                scorer.add_truth(res.name, to_model[c], frames[acting], boxes[acting], record.width, record.height)
    return scorer.result(class_names)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Settings:
    """How videos are cut and predicted: the knobs test.py, stream.py and app.py share."""

    score_threshold: float = 0.5
    window_sec: float | None = None     # None: the whole video is one clip (the published behaviour)
    stride_sec: float | None = None     # None: = window_sec
    annotate: bool = True
    batch_size: int = 1
    workers: int = 1
    folder_fps: float = video.DEFAULT_FOLDER_FPS   # frame rate of folders of numbered frames

    def __post_init__(self):
        if self.stride_sec is not None and self.window_sec is None:
            raise UsageError("--stride_sec needs --window_sec")
        if self.window_sec is not None and self.stride_sec is None:
            self.stride_sec = self.window_sec
        if not 0.0 <= self.score_threshold <= 1.0:
            raise UsageError(f"--score_threshold must be in [0, 1], got {self.score_threshold}")

    @property
    def mode(self) -> str:
        if self.window_sec:
            return f"windows of {self.window_sec:g} s every {self.stride_sec:g} s"
        return "whole video = one clip"


def trained_cut(info: dict) -> tuple[float | None, float | None]:
    """``(window_sec, stride_sec)`` as the checkpoint ``info`` was trained (Nones: whole videos). A tube-mode
    checkpoint strides half a window: each frame is then scored from a window it lies near the middle of, where its
    steps see motion on both sides (docs/EXPERIMENTS.md, "Tube mode", third session)."""
    window = info.get("window_sec")
    if not window:
        return None, None
    tube = (info.get("model_args") or {}).get("tube_steps", 0) > 0
    return float(window), float(window) / 2 if tube else float(window)


def predict_clips(model, clips: torch.Tensor, device, dtype=None) -> list[dict]:
    """The network on preprocessed clips ``(B, T, 3, S, S)``: per clip ``{"scores": (Q,), "labels": (Q,),
    "boxes": (Q, 4) normalised xyxy}`` (:func:`postprocess.outputs_to_predictions`), plus ``"step_scores" (Q, T)`` and
    ``"step_boxes" (Q, T, 4)`` from a tube-mode network."""
    with torch.inference_mode(), autocast(device, dtype):
        return postprocess.outputs_to_predictions(model(clips.to(device, non_blocking=True)))


def predict(model, loader, results: list[VideoResult], class_names, threshold: float, device, dtype,
            on_video_done) -> int:
    """Run the network over the clip stream; fills ``results``; returns the number of clips."""
    clips_done = 0
    local = {r.index: r for r in results}
    for batch in loader:
        preds = []
        if batch.clips is not None:
            preds = predict_clips(model, batch.clips, device, dtype)
            clips_done += len(preds)
        pred_iter = iter(preds)
        for item in batch.items:
            res = local[item.index]
            res.info = item.info or res.info
            if item.error:
                res.error = item.error
            elif item.has_clip:
                pred = next(pred_iter)
                res.clips += 1
                res.queries.append(pred)
                res.spans.append((item.start_sec, item.end_sec))
                res.frame_indices.append(item.frame_indices)
                res.frame_spans.append(item.frame_span)
                res.best_score = max(res.best_score, float(pred["scores"].max()) if pred["scores"].numel() else 0.0)
                if "step_scores" in pred:   # tube mode: detections come from the joined tubes (finish_video)
                    res.tube_mode = True
                    res.clip_tubes.append(tubes.clip_tubes(tubes.merge_duplicate_queries(pred, threshold),
                                                           item.frame_indices, item.frame_span, threshold, class_names))
                else:
                    res.detections += detections_from_prediction(pred, class_names, threshold,
                                                                 item.start_sec, item.end_sec)
            if item.done:
                on_video_done(res)
    return clips_done


def load_model(model_path, device, class_names=None):
    """Load the model once (:func:`backend.load_model`: a PyTorch checkpoint prepared for inference, or an ONNX
    export run by onnxruntime) and free the loaded dict. Returns ``(model, info, raw_ids)``."""
    t0 = time.perf_counter()
    net, info = backend.load_model(model_path, device=device, class_names=class_names)
    raw_ids = (info.pop("checkpoint", None) or {}).get("raw_class_ids")   # drop the loaded dict (optimizer...)
    release_free_memory()
    log.info("model %s (%s, classes %s, %d frames x %s px) loaded in %.1f s on %s",
             model_path, info["source"], ", ".join(info["class_names"]), info["num_frames"], info["img_size"],
             time.perf_counter() - t0, device)
    return net, info, raw_ids


class Annotator:
    """Writes annotated videos in a background thread, one at a time, once a video's detections are known; then
    calls ``on_written(result)`` there (test.py records the video as complete)."""

    def __init__(self, enabled: bool, targets: dict, on_written=None):
        self.enabled, self.targets, self.futures = enabled, targets, {}
        self.on_written = on_written or (lambda _res: None)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate")

    def submit(self, res: VideoResult) -> None:
        target = self.targets[res.path]
        if os.path.realpath(target) == os.path.realpath(res.path):
            log.warning("%s: not annotated: the annotated file would overwrite the input", res.name)
            self.on_written(res)
            return
        self.futures[res.name] = (res.path, self.pool.submit(self._write, res, target))

    def _write(self, res: VideoResult, target) -> None:
        annotate_video(res.path, target, res.tubes, res.info)
        self.on_written(res)

    def wait(self) -> tuple[int, list[str]]:
        """Wait for all; returns ``(count written, failures as 'name: reason')``."""
        done, failures = 0, []
        for name, (path, future) in self.futures.items():
            try:
                future.result()
                done += 1
            except DECODE_ERRORS as err:
                failures.append(f"{name}: {one_line(err, path)}")
                log.warning("annotation FAILED %s", failures[-1])
        self.pool.shutdown()
        return done, failures


class ProgressLog:
    """A line for the log file every ``PROGRESS_LOG_SEC`` (the bar goes to the console only): videos done of all,
    failed, seconds per video and the time left, for runs of hours over thousands of videos."""

    def __init__(self, bar, enabled: bool):
        self.bar, self.enabled = bar, enabled
        self.failed, self.last = 0, time.monotonic()

    def video_done(self, failed: bool) -> None:
        self.failed += failed
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)
        if self.enabled and time.monotonic() - self.last >= PROGRESS_LOG_SEC:
            self.last = time.monotonic()
            log.info("progress: %s", self.line())

    def line(self) -> str:
        done, total, elapsed = self.bar.n, self.bar.total, self.bar.format_dict["elapsed"]
        per_video = elapsed / max(done, 1)
        return (f"{done}/{total} videos ({self.failed} failed), {per_video:.2f} s/video, "
                f"about {tqdm.format_interval(per_video * (total - done))} left")


def run_videos(model, info, paths, names, targets, settings: Settings, device, dtype, rank: int = 0,
               on_complete=None):
    """Predict (and annotate, to ``targets``) videos. Returns ``(results, clips, annotated, annotation failures)``.
    ``on_complete(result)`` is called once a video's outputs are all written (its annotated video renamed into
    place): test.py then records it as complete."""
    stream = ClipStream(paths, info["num_frames"], info["img_size"], info["mean"], info["std"],
                        settings.window_sec, settings.stride_sec, settings.folder_fps)
    results = [VideoResult(k, name, os.fspath(p)) for k, (name, p) in enumerate(zip(names, paths))]
    on_complete = on_complete or (lambda _res: None)
    annotator = Annotator(settings.annotate, {os.fspath(p): t for p, t in zip(paths, targets)}, on_complete)
    bar = tqdm(total=len(paths), desc="videos", unit="video", disable=rank != 0, dynamic_ncols=True)
    progress, finished = ProgressLog(bar, rank == 0), set()

    def on_video_done(res: VideoResult) -> None:
        finished.add(res.index)
        progress.video_done(bool(res.error))
        if res.error:
            log.warning("FAILED %s: %s", res.name, res.error)
            res.queries = []
            return
        finish_video(res, settings)
        if settings.annotate:
            annotator.submit(res)
        else:
            on_complete(res)

    loader = make_loader(stream, settings.batch_size, settings.workers, pin_memory=device.type == "cuda")
    stopped = None
    try:
        clips = predict(model, loader, results, info["class_names"], settings.score_threshold, device, dtype,
                        on_video_done)
    except RuntimeError as err:   # a decoding worker died (a crash inside FFmpeg), or the network cannot run
        stopped = one_line(err)
        log.error("inference stopped: %s", stopped)
        clips = sum(r.clips for r in results)
    finally:
        bar.close()
    annotated, failures = annotator.wait()
    for res in results:
        if res.index not in finished:
            res.error, res.queries = f"not processed: inference stopped ({stopped})", []
    return results, clips, annotated, failures


# --------------------------------------------------------------------------- resumable outputs (test.py --resume)


JOURNAL_VERSION = 1


def journal_path(output_file, rank: int) -> pathlib.Path:
    """Rank ``rank``'s journal of completed videos: hidden, beside the output file."""
    out = pathlib.Path(output_file)
    return out.with_name(f".{out.name}.rank{rank}.journal")


def journal_paths(output_file) -> list[pathlib.Path]:
    """Every rank's journal beside the output file (a killed run may have had more ranks than this one)."""
    out = pathlib.Path(output_file)
    return sorted(out.parent.glob(f".{out.name}.rank*.journal"))


class Journal:
    """One rank's record of the videos it completed: after a header with the run's settings, one JSON line per video
    (its predictions.csv and frames CSV rows), written and flushed once its outputs are complete, so a kill loses at
    most the videos in progress. test.py merges the journals into the CSVs at the end, then removes them; with
    ``--resume`` it reads them (:func:`read_journal`) and skips the videos they hold."""

    def __init__(self, path, settings: dict, append: bool):
        self.path = pathlib.Path(path)
        self.lock = threading.Lock()   # records come from the annotating thread and the main thread
        if append:
            _drop_torn_tail(self.path)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")   # noqa: SIM115 (closed in close())
        if self.file.tell() == 0:
            self._write({"star_journal": JOURNAL_VERSION, "settings": settings})

    def record(self, res: VideoResult) -> None:
        self._write({"video": res.name, "rows": csv_rows(res), "frames": list(frame_rows(res))})

    def _write(self, entry: dict) -> None:
        with self.lock:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _drop_torn_tail(path: pathlib.Path) -> None:
    """Cut a line a kill left half-written at the end of ``path``, so that the next line starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_journal(path, settings: dict) -> dict[str, tuple[list, list]]:
    """``{video name: (predictions.csv rows, frames CSV rows)}`` of a journal; a torn last line is skipped. A journal
    written with other settings (model, threshold, windows, class names) is a UsageError: its rows would differ."""
    done = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except ValueError:   # a line a kill cut short
                continue
            if not isinstance(entry, dict) or not ({"star_journal", "video"} & entry.keys()):
                raise UsageError(f"--resume: {path}, line {number}: not a test.py journal entry")
            if "star_journal" in entry:
                _check_journal_settings(path, entry.get("settings") or {}, settings)
                continue
            done[entry["video"]] = (entry.get("rows") or [], entry.get("frames") or [])
    return done


def _check_journal_settings(path, old: dict, new: dict) -> None:
    for key, value in new.items():
        if old.get(key) != value:
            raise UsageError(f"--resume: {path} was written with {key} {old.get(key)!r}, this run has {value!r}; "
                             "run with the same flags, or without --resume to start again")


def read_outputs(output_file) -> dict[str, tuple[list, list]]:
    """``{video name: (rows, frame rows)}`` from a finished run's predictions CSV and frames CSV (both must be there;
    else nothing is taken from them)."""
    out, frames = pathlib.Path(output_file), frames_csv_path(output_file)
    if not (out.is_file() and frames.is_file()):
        return {}
    rows, frame_rows_by = _rows_by_video(out, CSV_FIELDS), _rows_by_video(frames, FRAME_FIELDS)
    return {name: (video_rows, frame_rows_by.get(name, [])) for name, video_rows in rows.items()}


def _rows_by_video(path: pathlib.Path, fields) -> dict[str, list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(fields):
            raise UsageError(f"--resume: {path}: not a test.py output (header {reader.fieldnames}); "
                             "move it away or run without --resume")
        grouped: dict[str, list[dict]] = {}
        for row in reader:
            grouped.setdefault(row["video_name"], []).append(row)
    return grouped


