"""The inputs of test.py and app.py and their clips for the network: which videos a folder holds (:func:`list_videos`),
their CSV names and annotated paths, and :class:`ClipStream`, which decodes and preprocesses each video's clips (the
whole video as one clip of T uniformly sampled frames, or windows) in ``DataLoader`` worker processes
(:func:`make_loader`). A video that cannot be read is an item with an error, never an exception.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import av
import numpy as np
import torch

import video
from runtime import UsageError, one_line

# What a decoding worker may meet in an odd file besides VideoError (PyAV/FFmpeg, numpy, cv2).
DECODE_ERRORS = (video.VideoError, av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError)


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
