"""Reading videos: probing, decoding, uniform frame sampling, sliding windows and the network's
preprocessing (writing videos is video_writer.py, drawing detections drawing.py).

Frames are RGB ``uint8`` numpy arrays of shape ``(H, W, 3)``; a clip is ``(T, H, W, 3)``.

A video is a file (any container PyAV reads) or a folder of numbered frames (``00001.jpg``,
``00002.jpg``, ... as UCF101-24 and JHMDB are distributed): every function that takes a video
path takes such a folder too (:func:`is_frame_folder`). Frame ``i`` of a folder is its ``i``-th
image in numeric order; its rate is the ``fps`` argument (:data:`DEFAULT_FOLDER_FPS` when None).

Everything decodes sequentially with PyAV (one pass, frame-threaded); nothing seeks per frame
and no function holds a whole video in memory (a folder's images are read only when wanted).
A clip that starts far into a constant-rate file seeks once to the keyframe before it
(:func:`decode_frames`), checked frame by frame against the frame clock.
Any failure of the underlying libraries is turned into :class:`VideoError`, a one-line message
that names the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fractions
import functools
import logging
import os
import re
from typing import Iterator

import av
import cv2
import numpy as np
import torch

from runtime import one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")  # compare with the lower-cased suffix
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # frames of a frame folder, any letter case
DEFAULT_FOLDER_FPS = 25.0  # a folder of frames says nothing about its rate (UCF101-24, JHMDB: 25)
SEEK_AFTER_FRAMES = 250  # a clip starting later seeks to a keyframe (x264's default keyframe interval)

log = logging.getLogger(__name__)

# What PyAV/FFmpeg raise on bad input. InvalidDataError and friends subclass FFmpegError;
# OSError covers unreadable files, ValueError odd stream parameters.
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


class VideoError(Exception):
    """A video cannot be used; the message is one line naming the file and the problem."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video holds. ``num_frames`` counts decodable frames (see :func:`probe_video`);
    ``duration_sec = num_frames / fps`` (the frame clock the windows use)."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration_sec: float


def is_video_file(path) -> bool:
    """True for names ending in one of VIDEO_EXTENSIONS, in any letter case."""
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def is_frame_folder(path) -> bool:
    """True for a folder holding at least one numbered image (``00001.jpg``, ``img_00001.png``...)."""
    try:
        return os.path.isdir(path) and bool(folder_frames(path))
    except VideoError:
        return False


def is_video_input(path) -> bool:
    """A video file (by its name) or a frame folder: what the video functions accept."""
    return is_frame_folder(path) if os.path.isdir(path) else is_video_file(path)


# stem = optional non-digit prefix + the frame number: 00001, img_00001, frame-12
_NUMBERED = re.compile(r"^(\D*)(\d+)$")


def folder_frames(path) -> tuple[str, ...]:
    """Paths of a frame folder's images in frame order (by number). Raises VideoError (one line) for
    a path that is not a folder or holds no numbered image.

    Names are ``<prefix><number>.<jpg|jpeg|png|bmp>``. A folder with several prefixes (MMAction2's
    ``img_*`` beside ``flow_x_*``) uses the largest group, RGB-looking names first on a tie."""
    path = os.fspath(path)
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise VideoError(f"{path}: cannot read the folder ({exc.strerror or exc})") from None
    return _list_folder(path, stamp)


@functools.lru_cache(maxsize=256)
def _list_folder(path: str, stamp: int) -> tuple[str, ...]:
    """The listing behind :func:`folder_frames`, cached per folder modification time (training reads
    a folder many times)."""
    del stamp  # part of the cache key only: a changed folder is listed again
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise VideoError(f"{path}: cannot read the folder ({exc.strerror or exc})") from None
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        match = _NUMBERED.match(stem)
        if match and ext.lower() in IMAGE_EXTENSIONS:
            groups.setdefault((match.group(1), ext.lower()), []).append((int(match.group(2)), name))
    if not groups:
        raise VideoError(f"{path}: a folder without numbered images ({', '.join(IMAGE_EXTENSIONS)})")
    key = max(groups, key=lambda k: (len(groups[k]), "flow" not in k[0].lower(), k[0] == "", k))
    return tuple(os.path.join(path, name) for _, name in sorted(groups[key]))


def _read_image(path) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB; an unreadable one -> VideoError naming it."""
    try:
        data = np.fromfile(path, np.uint8)  # imdecode: any path encoding, on any system
    except OSError as exc:
        raise VideoError(f"{path}: unreadable image ({exc.strerror or exc})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise VideoError(f"{path}: unreadable image (not a JPEG/PNG/BMP, or damaged)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class _ImageFrame:
    """One frame of a frame folder, read when converted (the interface of ``av.VideoFrame`` used here)."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path

    def to_ndarray(self, format: str = "rgb24") -> np.ndarray:  # noqa: A002  (PyAV's argument name)
        return _read_image(self.path)


def _iter_folder_frames(path) -> Iterator[_ImageFrame]:
    """The frames of a frame folder in order, unread until converted."""
    for image in folder_frames(path):
        yield _ImageFrame(image)


def _iter_source_frames(path) -> Iterator:
    """Frames of a video file (``av.VideoFrame``) or of a frame folder (:class:`_ImageFrame`), in order."""
    if os.path.isdir(path):
        return _iter_folder_frames(path)
    return _iter_av_frames(path)


@contextlib.contextmanager
def _open_video(path):
    """Open ``path`` and yield ``(container, first video stream)``; open failures -> VideoError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path)
    except _AV_ERRORS as exc:
        raise VideoError(f"{path}: not a readable video ({one_line(exc)})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is the bottleneck
        yield container, stream
    finally:
        container.close()


def _iter_av_frames(path) -> Iterator[av.VideoFrame]:
    """Decode every frame of the first video stream in presentation order, one pass.

    A packet that fails to decode is skipped (FFmpeg conceals most damage itself); a file
    that yields no frame at all while having packets raises VideoError. A truncated file
    simply ends early, which callers handle.
    """
    with _open_video(path) as (container, stream):
        yielded, failures, first_error = 0, 0, None
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()  # the final empty packet flushes the decoder
                except _AV_ERRORS as exc:
                    failures += 1
                    first_error = first_error or exc
                    continue
                for frame in frames:
                    yielded += 1
                    yield frame
        except _AV_ERRORS as exc:  # demuxer gave up mid-file (truncated): stop here
            first_error = first_error or exc
            failures += 1
        if failures and not yielded:
            raise VideoError(f"{path}: no decodable frame ({one_line(first_error)})")
        if failures:
            log.debug("%s: %d packet(s) failed to decode (%s)", path, failures, one_line(first_error))


def _stream_fps(stream) -> float:
    """Nominal frame rate of a stream; 25 when the container gives none."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return 25.0


def probe_video(path, count_frames: bool = True, fps: float | None = None) -> VideoInfo:
    """Size, exact frame count and rate of ``path``; decodes only the first frame.

    With ``count_frames`` (default) the frame count is the number of demuxed video packets
    (no decoding: fast, and right when the container's count is wrong or missing, e.g. AVI,
    MKV, variable frame rate). With ``count_frames=False`` the container's own count is
    trusted when it has one (header only, for quick validation of large datasets).
    Width/height are those of the first decoded frame. A frame folder has one frame per
    numbered image and the rate ``fps`` (None: DEFAULT_FOLDER_FPS); ``fps`` is ignored for
    files, which carry their own. Raises VideoError.
    """
    if os.path.isdir(path):
        return _probe_folder(path, fps)
    with _open_video(path) as (container, stream):
        fps = _stream_fps(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        header_count = stream.frames or 0
        packets, first, error = 0, None, None
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                if first is None:
                    try:
                        decoded = packet.decode()
                    except _AV_ERRORS as exc:
                        error = error or exc
                        decoded = []
                    first = decoded[0] if decoded else None
                    if first is not None and not count_frames and header_count:
                        break  # quick mode: header count + one decoded frame is enough
        except _AV_ERRORS as exc:  # truncated mid-file: the packets so far are the video
            error = error or exc
        if packets and first is None:
            reason = one_line(error) if error else "decoder produced nothing"
            raise VideoError(f"{path}: no decodable frame ({reason})")
    if first is not None:
        width, height = first.width, first.height
    num_frames = header_count if (not count_frames and header_count) else packets
    return VideoInfo(width, height, num_frames, fps, num_frames / fps)


def _probe_folder(path, fps: float | None) -> VideoInfo:
    """:func:`probe_video` for a frame folder: the image count, the first image's size."""
    fps = float(DEFAULT_FOLDER_FPS if fps is None else fps)
    if not fps > 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    images = folder_frames(path)
    try:
        first = _read_image(images[0])
    except VideoError as exc:
        raise VideoError(f"{os.fspath(path)}: no decodable frame ({one_line(exc)})") from None
    return VideoInfo(first.shape[1], first.shape[0], len(images), fps, len(images) / fps)


def sample_indices(num_frames: int, T: int) -> np.ndarray:
    """The published uniform sampling: ``np.linspace(0, n - 1, T).astype(int)`` (T,) int64.

    With fewer frames than T, indices repeat (the published behaviour)."""
    return np.linspace(0, num_frames - 1, T).astype(int)


def decode_frames(path, indices) -> tuple[np.ndarray, int]:
    """Decode once up to ``max(indices)``; return ``(frames (len, H, W, 3) uint8, decoded)``.

    ``decoded`` is the number of frames decoded; ``decoded <= max(indices)`` means the stream
    ended early (the container over-counted) and indices past the end got the last frame."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError(f"negative frame index in {idx.tolist()}")
    wanted, last_needed = set(idx.tolist()), int(idx.max()) if idx.size else -1
    kept: dict[int, np.ndarray] = {}
    last_frame, decoded = None, 0
    frames = _iter_indexed_frames(path, int(idx.min()) if idx.size else 0)
    try:
        for i, frame in frames:
            decoded, last_frame = i + 1, frame
            if i in wanted:  # convert only the frames we keep
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= last_needed:
                break
    finally:
        frames.close()  # closes the container even when we stop early
    if last_frame is None:
        raise VideoError(f"{os.fspath(path)}: zero frames")
    if decoded <= last_needed:
        tail = kept.get(decoded - 1)
        tail = tail if tail is not None else last_frame.to_ndarray(format="rgb24")
        for i in wanted:
            kept.setdefault(i, tail)
    return _stack([kept[i] for i in idx.tolist()]), decoded


class _NotSeekable(Exception):
    """A file whose frames cannot be numbered from their timestamps (variable rate, missing timestamps)."""


def _iter_indexed_frames(path, first: int) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """``(index, frame)`` of a video, from the start, or for a file from the keyframe at or before frame ``first``
    when that is more than :data:`SEEK_AFTER_FRAMES` in; from the start again (frames seen twice, numbered alike)
    where the file's timestamps turn out not to number its frames at a constant rate."""
    if first > SEEK_AFTER_FRAMES and not os.path.isdir(path):
        try:
            yield from _iter_seeking(path, first)
            return
        except _NotSeekable as reason:
            log.debug("%s: decoding from the start (%s)", path, reason)
    yield from enumerate(_iter_source_frames(path))


def _iter_seeking(path, first: int) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """Seek to the keyframe before frame ``first`` (at ``stream.average_rate``); every frame's index is its timestamp
    on that frame clock, and a timestamp off that clock, a jump or a seek past ``first`` raises _NotSeekable before
    anything is yielded that could be wrong."""
    with _open_video(path) as (container, stream):
        rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        if not rate or not base:
            raise _NotSeekable("no frame rate or time base")
        try:
            container.seek(start + int(fractions.Fraction(first) / rate / base), stream=stream, backward=True)
            expected = None
            for packet in container.demux(stream):
                for frame in packet.decode():
                    index = _frame_number(frame.pts, start, base, rate)
                    if index is None or (expected is None and index > first) or (expected not in (None, index)):
                        raise _NotSeekable(f"frame timestamp {frame.pts} off the {float(rate):g} fps clock")
                    expected = index + 1
                    yield index, frame
        except _AV_ERRORS as exc:
            raise _NotSeekable(one_line(exc)) from None


def _frame_number(pts, start: int, base: fractions.Fraction, rate: fractions.Fraction) -> int | None:
    """The frame number a timestamp gives on a constant-rate clock, or None when it falls between frames."""
    if pts is None:
        return None
    position = (pts - start) * base * rate
    number = round(position)
    return number if number >= 0 and abs(position - number) < 0.01 else None


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    """Stack frames; a stream whose size changes mid-way is resized to its first frame's size."""
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    h, w = frames[0].shape[:2]
    same = [f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h)) for f in frames]
    return np.stack(same)


def read_frames(path, indices, info: VideoInfo | None = None) -> np.ndarray:
    """Frames at ``indices`` (may repeat, any order) as ``(len(indices), H, W, 3)`` uint8 RGB.

    One sequential decoding pass that stops after the largest index; only wanted frames are
    converted and kept. Indices past the true end of the stream repeat the last frame.
    ``info`` is accepted so callers with a known probe can pass it; decoding does not need it.
    """
    del info  # the pass itself finds the end of the stream
    return decode_frames(path, indices)[0]


def sample_clip(path, num_frames: int, fps: float | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Uniformly sampled clip: frames ``(T, H, W, 3)`` uint8 at :func:`sample_indices`, and the probe.

    If decoding ends before the probed count (a lying container or undecodable packets),
    the indices are re-derived from the true count, so frames stay uniform over the video.
    ``fps``: the rate of a frame folder (see :func:`probe_video`)."""
    info = probe_video(path, fps=fps) if fps is not None else probe_video(path)
    if info.num_frames == 0:
        raise VideoError(f"{os.fspath(path)}: zero frames")
    idx = sample_indices(info.num_frames, num_frames)
    frames, decoded = decode_frames(path, idx)
    if decoded <= idx.max():
        info = dataclasses.replace(info, num_frames=decoded, duration_sec=decoded / info.fps)
        frames, _ = decode_frames(path, sample_indices(decoded, num_frames))
    return frames, info


def iter_frames(path) -> Iterator[np.ndarray]:
    """Every frame of ``path`` in order, ``(H, W, 3)`` uint8 RGB, decoded sequentially."""
    for frame in _iter_source_frames(path):
        yield frame.to_ndarray(format="rgb24")


def window_spans(num_frames: int, fps: float, window_sec: float, stride_sec: float) -> list[tuple[int, int]]:
    """Frame spans ``[start, end)`` of windows of ``window_sec`` every ``stride_sec``.

    The spans cover the whole video: the last one ends at the last frame (it may overlap
    its neighbour more than the stride). A video shorter than a window is one span."""
    if window_sec <= 0 or stride_sec <= 0:
        raise ValueError("window_sec and stride_sec must be positive")
    return window_spans_frames(num_frames, seconds_to_frames(window_sec, fps), seconds_to_frames(stride_sec, fps))


def seconds_to_frames(seconds: float, fps: float) -> int:
    """A duration as a whole number of frames (at least 1): how windows given in seconds are cut."""
    return max(1, int(round(seconds * fps)))


def window_spans_frames(num_frames: int, win: int, stride: int) -> list[tuple[int, int]]:
    """:func:`window_spans` with the window and stride in frames: spans ``[start, end)`` every
    ``stride`` frames, the last one ending at the last frame; one span for a short video."""
    if win < 1 or stride < 1:
        raise ValueError("window and stride must be at least one frame")
    if num_frames <= win:
        return [(0, num_frames)] if num_frames > 0 else []
    starts = list(range(0, num_frames - win + 1, stride))
    if starts[-1] + win < num_frames:
        starts.append(num_frames - win)
    return [(s, s + win) for s in starts]


def iter_windows(path, num_frames: int, window_sec: float, stride_sec: float,
                 info: VideoInfo | None = None, fps: float | None = None) -> Iterator[tuple[np.ndarray, float, float]]:
    """Yield ``(frames (T, H, W, 3) uint8, start_sec, end_sec)`` for sliding windows.

    T frames are sampled uniformly inside each window (:func:`sample_indices` over the
    window's frames). One sequential pass; only the windows still being filled hold frames,
    so memory is bounded by (window / stride) clips. Times use the frame clock i / fps.
    ``fps``: the rate of a frame folder when ``info`` is not given (see :func:`probe_video`).
    """
    info = info or (probe_video(path, fps=fps) if fps is not None else probe_video(path))
    fps = info.fps
    spans = window_spans(info.num_frames, fps, window_sec, stride_sec)
    plans = [(s, e, s + sample_indices(e - s, num_frames)) for s, e in spans]
    active: list[tuple[int, int, np.ndarray, list]] = []
    nxt, last = 0, None
    frames = _iter_source_frames(path)
    try:
        for i, frame in enumerate(frames):
            while nxt < len(plans) and plans[nxt][0] <= i:
                s, e, idx = plans[nxt]
                active.append((s, e, idx, [None] * len(idx)))
                nxt += 1
            rgb = None
            for _, _, idx, slots in active:
                for k in np.flatnonzero(idx == i):
                    rgb = rgb if rgb is not None else frame.to_ndarray(format="rgb24")
                    slots[k] = rgb
            last = (i, rgb if rgb is not None else frame)
            while active and active[0][2].max() <= i:
                s, e, _, slots = active.pop(0)
                yield _stack(slots), s / fps, e / fps
            if not active and nxt >= len(plans):
                return
    finally:
        frames.close()
    # The stream ended before the probed count: finish started windows with the last frame.
    if last is None:
        raise VideoError(f"{os.fspath(path)}: zero frames")
    n_true, tail = last[0] + 1, last[1]
    tail = tail if isinstance(tail, np.ndarray) else tail.to_ndarray(format="rgb24")
    pending = active + [(s, e, idx, [None] * len(idx)) for s, e, idx in plans[nxt:] if s < n_true]
    for s, e, _, slots in pending:
        yield _stack([x if x is not None else tail for x in slots]), s / fps, min(e, n_true) / fps


def preprocess(frames, img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The one preprocessing of training and inference.

    frames: ``(T, H, W, 3)`` uint8 RGB (array or list). img_size: S (or ``(S_h, S_w)``).
    Returns float32 ``(T, 3, S, S)``: bilinear resize (``cv2.INTER_LINEAR``), ``/255``,
    ``(x - mean) / std``.
    """
    sh, sw = (img_size, img_size) if np.isscalar(img_size) else tuple(img_size)
    out = np.empty((len(frames), int(sh), int(sw), 3), np.uint8)
    for t, frame in enumerate(frames):
        frame = np.ascontiguousarray(frame)  # views (flips, crops) are not valid cv2 input
        out[t] = frame if frame.shape[:2] == (sh, sw) else cv2.resize(
            frame, (int(sw), int(sh)), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(out).float().div_(255.0)
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()
