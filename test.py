#!/usr/bin/env python
"""STAR inference: predict actions (class, box, score, time span) for a folder of videos.

    python test.py --input_dir VIDEOS --output_file predictions.csv --model_path best_model.pth \
        [--score_threshold 0.3]

Writes ``predictions.csv`` (``video_name,pred_class,score,x1,y1,x2,y2,start_sec,end_sec``, one row
per detection, boxes normalised xyxy; a video without detection gets one ``no_object`` row with an
empty box), annotated H.264 videos (``annotated_videos/`` beside the output file) and
``test_log_<timestamp>.txt`` beside the output file. ``--labels DATASET_DIR`` also scores the
predictions with the training metrics.

A query is a detection when its best foreground probability (softmax over all C+1 logits) is at
least ``--score_threshold`` (the published rule). Without ``--window_sec`` each video is one clip
of T uniformly sampled frames (the published behaviour); with it, windows of ``--window_sec``
every ``--stride_sec`` are predicted separately and detections of one class with overlapping
boxes in overlapping or consecutive windows are joined into one time span.

Pipeline: the checkpoint is loaded once; decoding and preprocessing run in ``--workers`` background
processes (a ``DataLoader`` over a stream of clips) while the network runs batches under
``torch.inference_mode`` (fp16 autocast on CUDA, bf16 on CPUs with native bf16); annotated videos
are written by a background thread in a second sequential pass over each input once its
predictions are known, so no whole video is ever held in memory. A video that cannot be read is
reported (log and summary) and skipped. Under ``torchrun`` each rank takes its share of the
videos and rank 0 writes the merged CSV.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Iterable, Iterator, Sequence

import av
import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

import metrics
import model as star_model
import video
from runtime import UsageError, autocast, autocast_settings, cpu_has_native_bf16, resolve_device  # noqa: F401

log = logging.getLogger("star.test")

NO_OBJECT = metrics.NO_OBJECT_NAME
CSV_FIELDS = ("video_name", "pred_class", "score", "x1", "y1", "x2", "y2", "start_sec", "end_sec")
JOIN_IOU = 0.3            # boxes of consecutive windows "overlap" when their IoU is at least this
EXIT_USAGE = 2            # bad model path, bad checkpoint, bad input: one line and this code
# What a decoding worker may meet in an odd file besides VideoError (PyAV/FFmpeg, numpy, cv2).
_DECODE_ERRORS = (video.VideoError, av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError)


# --------------------------------------------------------------------------- command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR inference on a folder of videos", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input_dir", required=True,
                        help="folder of videos (.mp4 .avi .mov .mkv, any letter case) or one video file")
    parser.add_argument("--output_file", default="predictions.csv", help="predictions CSV to write")
    parser.add_argument("--model_path", default="best_model.pth",
                        help="STAR checkpoint (this project's, or the published raw state_dict)")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="a query is a detection when its best foreground probability is at least this")
    parser.add_argument("--annotated_dir", default=None,
                        help="where annotated videos go (default: annotated_videos/ beside the output file)")
    parser.add_argument("--no_annotate", action="store_true", help="do not write annotated videos")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--batch_size", type=_positive_int, default=None,
                        help="clips per network call (default: 1 on cpu, 8 on cuda)")
    parser.add_argument("--workers", type=_non_negative_int, default=None,
                        help="background decoding processes (0 = decode in the main process; "
                             "default: 1 on cpu, 4 on cuda)")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--window_sec", type=_positive_float, default=None,
                        help="long-video mode: predict windows of this many seconds (default: whole video = 1 clip)")
    parser.add_argument("--stride_sec", type=_positive_float, default=None,
                        help="long-video mode: seconds between window starts (default: --window_sec)")
    parser.add_argument("--labels", default=None, metavar="DATASET_DIR",
                        help="dataset folder in the training layout: score the predictions against its labels")
    parser.add_argument("--recursive", action="store_true", help="also look for videos in sub-folders")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def release_free_memory() -> None:
    """Give memory freed by the C allocator back to the system (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------- inputs


def list_videos(input_path, recursive: bool = False, exclude=None) -> list[pathlib.Path]:
    """The videos to predict, in sorted order: ``input_path`` itself when it is a file, else the
    files in it (and its sub-folders with ``recursive``) whose suffix is a video extension in any
    letter case. Hidden files and folders and anything under ``exclude`` are left out."""
    root = pathlib.Path(input_path)
    if root.is_file():
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
            if any(part.startswith(".") for part in rel.parts) or not video.is_video_file(path.name):
                continue
            if excluded is not None and (path.resolve() == excluded or excluded in path.resolve().parents):
                continue
            if path.is_file():
                found.append(path)
    except PermissionError as err:
        raise UsageError(f"--input_dir {root}: cannot be read ({err.strerror})") from None
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def video_names(videos: Sequence[pathlib.Path], input_path) -> list[str]:
    """CSV names: the path relative to the input folder (the file name when flat)."""
    root = pathlib.Path(input_path)
    if root.is_file():
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
    """

    index: int
    clip: torch.Tensor | None = None
    start_sec: float = 0.0
    end_sec: float = 0.0
    info: video.VideoInfo | None = None
    error: str | None = None
    done: bool = False
    carried: bool = False   # the clip was moved into the batch tensor by collate_items

    @property
    def has_clip(self) -> bool:
        return self.clip is not None or self.carried


class ClipStream(torch.utils.data.IterableDataset):
    """Clips of a list of videos, decoded sequentially; each DataLoader worker takes every
    ``num_workers``-th video. Failures are items (``error`` set), never exceptions, so one bad
    file is reported and the others go on."""

    def __init__(self, videos: Sequence, num_frames: int, img_size, mean, std,
                 window_sec: float | None = None, stride_sec: float | None = None):
        self.videos = [os.fspath(v) for v in videos]
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
                frames, info = video.sample_clip(path, self.num_frames)
                yield ClipItem(index, self._prep(frames), 0.0, info.duration_sec, info, done=True)
                return
            info = video.probe_video(path)
            if info.num_frames == 0:
                raise video.VideoError(f"{path}: zero frames")
            for frames, start, end in video.iter_windows(path, self.num_frames, self.window_sec,
                                                         self.stride_sec, info=info):
                yield ClipItem(index, self._prep(frames), start, end, info)
            yield ClipItem(index, None, info=info, done=True)
        except _DECODE_ERRORS as err:
            yield ClipItem(index, error=one_line(err, path), done=True)

    def _prep(self, frames) -> torch.Tensor:
        return video.preprocess(frames, self.img_size, self.mean, self.std)


def one_line(err: BaseException, path=None) -> str:
    """First line of an error, without the file name prefix (the caller names the file)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    if path is not None:
        path = os.fspath(path)
        if text.startswith(path + ": "):
            text = text[len(path) + 2:]
        text = text.replace(f": '{path}'", "").replace(f" '{path}'", "")
    return re.sub(r"\[Errno -?\d+\] ", "", text)[:300]


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
    """The published rule (``metrics.detections``) as ``Detection`` objects for a time span, best first."""
    return [Detection(label, class_names[label], score, tuple(box), float(start_sec), float(end_sec))
            for label, score, box in metrics.detections(pred, threshold)]


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


def write_csv(rows: Iterable[dict], path) -> None:
    """Write the predictions CSV atomically (a temporary file beside it, then rename)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it private; a CSV is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- annotation


def annotate_video(src, dst, detections: Sequence[Detection], info: video.VideoInfo) -> int:
    """Write ``dst`` (H.264 MP4): every frame of ``src`` at its size and rate, each detection's box
    drawn on the frames of its time span. One sequential pass; returns the frames written."""
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    eps = 1e-9
    spans = [(d.start_sec - eps, d.end_sec - eps, (d.class_name, d.score, d.box)) for d in detections]
    count = 0
    try:
        writer = None
        for i, frame in enumerate(video.iter_frames(src)):
            if writer is None:   # the decoded size wins over the container's
                writer = video.H264Writer(dst, frame.shape[1], frame.shape[0], info.fps)
            t = i / info.fps
            shown = [det for start, end, det in spans if start <= t < end]
            writer.write(video.draw_detections(frame, shown) if shown else frame)
            count += 1
        if writer is None:
            raise video.VideoError(f"{src}: zero frames")
        writer.close()
    except BaseException:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise
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


def load_labels(labels_dir, model_names, raw_ids=None) -> tuple[list, list[int]]:
    """The dataset's records and, per dataset class, the model's class id (checked before inference)."""
    import dataset
    try:
        records, class_map, problems = dataset.load_dataset(labels_dir)
    except dataset.DatasetError as err:
        raise UsageError(f"--labels {labels_dir}: {one_line(err)}") from None
    if problems:
        log.warning("--labels: %d problem(s) in the dataset:\n%s", len(problems), dataset.format_problems(problems))
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
    report = metrics.format_report(result, list(model_names))
    log.info("evaluation against %s (%d video(s) scored, %d predicted video(s) not in the dataset):\n%s",
             labels_dir, len(preds), unlabelled, report)
    out = pathlib.Path(output_file)
    json_path, text_path = out.with_name(out.stem + "_metrics.json"), out.with_name(out.stem + "_metrics.txt")
    json_path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    text_path.write_text(report + "\n", encoding="utf-8")
    log.info("evaluation saved to %s and %s", json_path, text_path)
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- logging and distribution


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except (OSError, ValueError):
            self.handleError(record)


def setup_logging(log_path: pathlib.Path | None, rank: int = 0) -> None:
    """Console (INFO on rank 0, WARNING elsewhere) plus the log file (rank 0), on the root logger
    so that the warnings of video.py and dataset.py land in the same places. ``star.*`` logs INFO."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_star_test", False)]:
        root.removeHandler(h)
        h.close()
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("star").setLevel(logging.INFO)
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    handlers = [console]
    if log_path is not None:
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(handler)
    for h in handlers:
        h._star_test = True
        root.addHandler(h)


def close_logging() -> None:
    """Remove and close the handlers of :func:`setup_logging` (the log file is complete)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_star_test", False)]:
        root.removeHandler(h)
        h.close()


def distributed_setup(device_name: str) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (in rank order) on every rank; ``[obj]`` when not distributed."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- the run


def predict(model, loader, results: list[VideoResult], class_names, args, device, dtype,
            on_video_done, progress) -> int:
    """Run the network over the clip stream; fills ``results``; returns the number of clips."""
    clips_done = 0
    local = {r.index: r for r in results}
    for batch in loader:
        preds = []
        if batch.clips is not None:
            x = batch.clips.to(device, non_blocking=True)
            with torch.inference_mode(), autocast(device, dtype):
                preds = metrics.outputs_to_predictions(model(x))
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
                res.best_score = max(res.best_score, float(pred["scores"].max()) if pred["scores"].numel() else 0.0)
                res.detections += detections_from_prediction(pred, class_names, args.score_threshold,
                                                             item.start_sec, item.end_sec)
            if item.done:
                on_video_done(res)
                progress.update(1)
    return clips_done


def validate_args(args) -> None:
    """Cross-flag checks argparse cannot do (UsageError); fills the default stride."""
    if args.stride_sec is not None and args.window_sec is None:
        raise UsageError("--stride_sec needs --window_sec")
    if args.window_sec is not None and args.stride_sec is None:
        args.stride_sec = args.window_sec
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score_threshold must be in [0, 1], got {args.score_threshold}")


def prepare_output(args, rank: int) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Create the output folder, start logging; returns ``(output file, log file or None)``."""
    out = pathlib.Path(args.output_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_file {out}: cannot create its folder ({err.strerror})") from None
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    log_path = out.parent / f"test_log_{stamp}.txt" if rank == 0 else None
    setup_logging(log_path, rank)
    log.info("command: %s", " ".join(sys.argv))
    return out, log_path


def load_model(args, device):
    """Load the checkpoint once, prepare it for inference (BN folding, channels_last_3d) and free the
    loaded dict. Returns ``(model, info, raw_ids)``."""
    t0 = time.perf_counter()
    net, info = star_model.load_checkpoint(args.model_path, device=device, class_names=args.class_names)
    raw_ids = (info.pop("checkpoint", None) or {}).get("raw_class_ids")   # drop the loaded dict (optimizer...)
    star_model.prepare_for_inference(net)
    release_free_memory()
    log.info("model %s (%s, classes %s, %d frames x %s px) loaded in %.1f s on %s",
             args.model_path, info["source"], ", ".join(info["class_names"]), info["num_frames"], info["img_size"],
             time.perf_counter() - t0, device)
    return net, info, raw_ids


class Annotator:
    """Writes annotated videos in a background thread, one at a time, once a video's detections are known."""

    def __init__(self, enabled: bool, targets: dict):
        self.enabled, self.targets, self.futures = enabled, targets, {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate")

    def submit(self, res: VideoResult) -> None:
        target = self.targets[res.path]
        if os.path.realpath(target) == os.path.realpath(res.path):
            log.warning("%s: not annotated: the annotated file would overwrite the input", res.name)
            return
        self.futures[res.name] = (res.path, self.pool.submit(annotate_video, res.path, target, res.detections,
                                                             res.info))

    def wait(self) -> tuple[int, list[str]]:
        """Wait for all; returns ``(count written, failures as 'name: reason')``."""
        done, failures = 0, []
        for name, (path, future) in self.futures.items():
            try:
                future.result()
                done += 1
            except _DECODE_ERRORS as err:
                failures.append(f"{name}: {one_line(err, path)}")
                log.warning("annotation FAILED %s", failures[-1])
        self.pool.shutdown()
        return done, failures


def run_videos(model, info, paths, names, targets, args, device, dtype, batch_size, workers, rank):
    """Predict (and annotate) this rank's videos. Returns ``(results, clips, annotated, annotation failures)``."""
    stream = ClipStream(paths, info["num_frames"], info["img_size"], info["mean"], info["std"],
                        args.window_sec, args.stride_sec)
    results = [VideoResult(k, name, os.fspath(p)) for k, (name, p) in enumerate(zip(names, paths))]
    annotator = Annotator(not args.no_annotate, {os.fspath(p): t for p, t in zip(paths, targets)})

    def on_video_done(res: VideoResult) -> None:
        if res.error:
            log.warning("FAILED %s: %s", res.name, res.error)
            res.queries = []
            return
        if args.window_sec:
            gap = max(0.0, args.stride_sec - args.window_sec)
            res.detections = join_windows(res.detections, JOIN_IOU, max_gap_sec=gap)
        if not args.no_annotate:
            annotator.submit(res)

    progress = tqdm(total=len(paths), desc="videos", unit="video", disable=rank != 0, dynamic_ncols=True)
    loader = make_loader(stream, batch_size, workers, pin_memory=device.type == "cuda")
    try:
        clips = predict(model, loader, results, info["class_names"], args, device, dtype, on_video_done, progress)
    except RuntimeError as err:   # a decoding worker died (e.g. a crash inside FFmpeg)
        log.error("inference stopped: %s", one_line(err))
        clips = sum(r.clips for r in results)
    finally:
        progress.close()
    annotated, failures = annotator.wait()
    for res in results:
        if res.error is None and res.info is None:
            res.error = "not processed (inference stopped)"
    return results, clips, annotated, failures


def main(args) -> int:
    started = time.perf_counter()
    rank, world, local_rank = distributed_setup(args.device)
    out, log_path = prepare_output(args, rank)
    validate_args(args)
    device = resolve_device(args.device, local_rank)
    dtype, precision_note = autocast_settings(device, args.precision)
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 1)
    annotated_dir = pathlib.Path(args.annotated_dir) if args.annotated_dir else out.parent / "annotated_videos"

    videos = list_videos(args.input_dir, args.recursive, exclude=None if args.no_annotate else annotated_dir)
    if not videos:
        raise UsageError(f"--input_dir {args.input_dir}: no videos ({' '.join(video.VIDEO_EXTENSIONS)}, any case)")
    names = video_names(videos, args.input_dir)
    targets = annotated_paths(names, annotated_dir)
    model, info, raw_ids = load_model(args, device)
    labels = load_labels(args.labels, info["class_names"], raw_ids) if args.labels else None
    mode = f"windows of {args.window_sec:g} s every {args.stride_sec:g} s" if args.window_sec else "whole video = one clip"
    log.info("%d video(s) from %s (%s), threshold %g; %s, batch %d, %d decoding worker(s)", len(videos),
             args.input_dir, mode, args.score_threshold, precision_note, batch_size, workers)

    t_net = time.perf_counter()
    mine = list(range(rank, len(videos), world))
    results, clips, annotated, failures = run_videos(
        model, info, [videos[i] for i in mine], [names[i] for i in mine], [targets[i] for i in mine],
        args, device, dtype, batch_size, workers, rank)
    elapsed_net = time.perf_counter() - t_net
    # Under torchrun every rank sends its results to every rank; rank 0 writes.
    parts = gather(([dataclasses.replace(r, queries=r.queries if args.labels else []) for r in results],
                    clips, annotated, failures), world)
    order = {name: i for i, name in enumerate(names)}
    all_results = sorted((r for part in parts for r in part[0]), key=lambda r: order[r.name])
    if rank == 0:
        rows = [row for r in all_results if r.error is None for row in csv_rows(r)]
        write_csv(rows, out)
        log.info("predictions written to %s (%d rows)", out, len(rows))
        if labels is not None:
            evaluate_predictions(all_results, args.labels, info["class_names"], raw_ids, args.score_threshold,
                                 out, labels)
        summary(all_results, sum(p[1] for p in parts), sum(p[2] for p in parts), [f for p in parts for f in p[3]],
                annotated_dir, args, time.perf_counter() - started, elapsed_net, log_path)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def summary(results, clips, annotated, annotation_failures, annotated_dir, args, seconds, net_seconds,
            log_path) -> None:
    failed = [r for r in results if r.error]
    ok = len(results) - len(failed)
    detections = sum(len(r.detections) for r in results if r.error is None)
    lines = ["summary:",
             f"  videos      : {len(results)} ({ok} predicted, {len(failed)} failed)",
             f"  detections  : {detections} (score >= {args.score_threshold:g}); "
             f"{sum(1 for r in results if r.error is None and not r.detections)} video(s) no_object",
             f"  clips       : {clips} in {net_seconds:.1f} s ({clips / max(net_seconds, 1e-9):.2f} clips/s)",
             f"  seconds     : {seconds:.1f} end to end",
             f"  predictions : {args.output_file}"]
    if not args.no_annotate:
        lines.append(f"  annotated   : {annotated} video(s) in {annotated_dir}"
                     + (f", {len(annotation_failures)} failed" if annotation_failures else ""))
    if log_path:
        lines.append(f"  log         : {log_path}")
    if failed:
        lines.append("  failures:")
        lines += [f"    {r.name}: {r.error}" for r in failed]
    if annotation_failures:
        lines.append("  annotation failures:")
        lines += [f"    {f}" for f in annotation_failures]
    log.info("\n".join(lines))


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except (UsageError, star_model.CheckpointError) as err:
        message = f"error: {one_line(err)}"
        if any(getattr(h, "_star_test", False) for h in logging.getLogger().handlers):
            log.error(message)
        else:
            print(message, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_logging()


if __name__ == "__main__":
    sys.exit(cli())
