"""What ``stream.py --source`` names and how it is read: a camera index or device, a URL or a video file is parsed
into a :class:`SourceSpec` and opened as a :class:`FileSource` (frames with their times on the file's frame clock) or a
:class:`LiveSource` (FFmpeg with a read timeout, which tells a stall from a broken stream)."""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import time
from typing import Iterator

import av
import numpy as np

import video
from clip_loader import DECODE_ERRORS
from runtime import UsageError, one_line

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
DEFAULT_FPS = 25.0        # a live source that states no usable rate
# What reading a source may raise besides VideoError: FFmpeg errors (a read timeout is av.error.ExitError),
# OS errors, and odd stream parameters.
READ_ERRORS = DECODE_ERRORS


class SourceError(Exception):
    """A source that cannot be opened or read; one line naming it."""


class Stalled(Exception):
    """A live source gave no data for its read timeout (--stall_sec)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What ``--source`` names: ``kind`` is ``file``, ``url`` or ``camera``; ``target`` what FFmpeg opens."""

    kind: str
    target: str
    format: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.kind != "file"


def parse_source(text: str, options: dict | None = None) -> SourceSpec:
    """``--source`` as a :class:`SourceSpec`; UsageError (one line) when it names nothing usable."""
    options = dict(options or {})
    if text.isdigit() or text.startswith("/dev/video"):
        return _camera_spec(text, options)
    if text.lower().startswith(URL_SCHEMES):
        if text.lower().startswith(("rtsp://", "rtsps://")):
            options.setdefault("rtsp_transport", "tcp")   # UDP RTP loses packets on busy networks: grey frames
        return SourceSpec("url", text, None, options)
    path = pathlib.Path(text)
    if not path.is_file():
        raise UsageError(f"--source {text}: no such video file (or a camera index, or a URL: "
                         f"{', '.join(s[:-3] for s in URL_SCHEMES)})")
    return SourceSpec("file", str(path), None, options)


def _camera_spec(text: str, options: dict) -> SourceSpec:
    """A camera index or device: v4l2 on Linux, avfoundation on macOS."""
    if sys.platform.startswith("linux"):
        device = text if text.startswith("/dev/") else f"/dev/video{int(text)}"
        return SourceSpec("camera", device, "v4l2", options)
    if sys.platform == "darwin" and text.isdigit():
        return SourceSpec("camera", text, "avfoundation", options)
    raise UsageError(f"--source {text}: camera indices work on Linux (v4l2) and macOS (avfoundation); "
                     "elsewhere pass the camera's URL or an FFmpeg device as a URL")


def parse_options(pairs) -> dict:
    """``KEY=VALUE`` strings (``--source_option``) as a dict of FFmpeg options."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--source_option {pair!r}: expected KEY=VALUE (an FFmpeg option)")
        out[key] = value
    return out


class FileSource:
    """A video file's frames with their times on the frame clock (``i / fps``, as test.py's windows)."""

    live = False

    def __init__(self, spec: SourceSpec):
        self.path = spec.target
        try:
            info = video.probe_video(self.path, count_frames=False)
        except READ_ERRORS as err:
            raise SourceError(f"--source {self.path}: {one_line(err, self.path)}") from None
        self.fps, self.width, self.height = info.fps, info.width, info.height

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        for i, image in enumerate(video.iter_frames(self.path)):
            yield image, i / self.fps

    def close(self) -> None:
        """Nothing held between frames (iter_frames closes its container)."""


class LiveSource:
    """A camera or URL opened by FFmpeg with a timeout: a read that waits longer raises ``av.error.ExitError``."""

    live = True

    def __init__(self, spec: SourceSpec, timeout_sec: float):
        self.timeout_sec = timeout_sec
        try:
            self.container = av.open(spec.target, format=spec.format, options=dict(spec.options),
                                     timeout=(timeout_sec, timeout_sec))
        except READ_ERRORS as err:
            raise SourceError(f"--source {spec.target}: cannot open ({one_line(err, spec.target)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise SourceError(f"--source {spec.target}: no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "SLICE"   # frame threads would hold several frames back: latency
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate and 1 <= float(rate) <= 240 else DEFAULT_FPS
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height

    def frames(self) -> Iterator[tuple[np.ndarray, float | None]]:
        """Decoded frames with their timestamps; raises :class:`Stalled` when reads wait out the timeout."""
        for packet in self._packets():
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:   # one damaged packet: FFmpeg conceals, go on
                continue
            for frame in decoded:
                yield frame.to_ndarray(format="rgb24"), frame.time

    def _packets(self) -> Iterator:
        """The demuxer's packets. A read cut by the timeout still hands over the packets the demuxer held
        (a last frame or two) before the error comes, so a stall is told by a read that waited out the
        timeout just before the error, not by the time since the last frame."""
        packets = self.container.demux(self.stream)
        waited = None   # (start, end) of the latest read that waited out most of the timeout
        while True:
            started = time.monotonic()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.ExitError:
                now = time.monotonic()
                if now - started >= 0.9 * self.timeout_sec:
                    waited = (started, now)
                if waited is not None and now - waited[1] < self.timeout_sec:
                    raise Stalled(f"stalled: no data for {now - waited[0]:.1f} s") from None
                raise
            if time.monotonic() - started >= 0.9 * self.timeout_sec:
                waited = (started, time.monotonic())
            yield packet

    def close(self) -> None:
        with contextlib.suppress(*READ_ERRORS):
            self.container.close()


def open_source(spec: SourceSpec, timeout_sec: float):
    """A :class:`FileSource` or :class:`LiveSource`; SourceError (one line) when it cannot be opened."""
    return LiveSource(spec, timeout_sec) if spec.live else FileSource(spec)
