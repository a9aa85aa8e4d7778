"""Writing videos with PyAV: RGB frames in, browser-playable H.264 MP4 (or another codec) out.

Frames are RGB ``uint8`` numpy arrays of shape ``(H, W, 3)``. A file that cannot be written is a
:class:`video.VideoError`, a one-line message that names the file.
"""
from __future__ import annotations

import fractions
import os

import av
import cv2
import numpy as np

from runtime import one_line
from video import _AV_ERRORS, VideoError


def _as_rate(fps) -> fractions.Fraction:
    """Frame rate as a Fraction; 29.97002997 -> 30000/1001 so NTSC rates stay exact."""
    rate = fractions.Fraction(fps).limit_denominator(10000)
    if rate <= 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    return rate


class VideoWriter:
    """Write RGB frames ``(H, W, 3)`` uint8 with PyAV; ``write``, ``close``, context manager.

    ``codec``/``pix_fmt``/``options`` choose the encoding (the sample-data tool uses MJPEG
    and MPEG-4 too). Sizes are rounded up to even by replicating the last row/column when
    the pixel format needs it (4:2:0); frames of another size are resized to the declared one.
    """

    def __init__(self, path, width: int, height: int, fps, codec: str = "libx264",
                 pix_fmt: str = "yuv420p", options: dict | None = None):
        self.path, self.width, self.height = os.fspath(path), int(width), int(height)
        self._pad = pix_fmt in ("yuv420p", "yuvj420p", "nv12")
        even = (lambda v: v + (v % 2)) if self._pad else (lambda v: v)
        rate = self._rate = _as_rate(fps)
        container_options = {"movflags": "+faststart"} if self.path.lower().endswith((".mp4", ".mov")) else {}
        try:
            self._container = av.open(self.path, "w", options=container_options)
        except _AV_ERRORS as exc:
            raise VideoError(f"{self.path}: cannot write video ({one_line(exc)})") from None
        try:
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height = even(self.width), even(self.height)
            self._stream.pix_fmt = pix_fmt
            self._stream.options = dict(options or {})
        except _AV_ERRORS as exc:
            self._container.close()
            raise VideoError(f"{self.path}: cannot write {codec} video ({one_line(exc)})") from None
        self._count = 0

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB uint8 frame (H, W, 3)."""
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if frame.shape[:2] != (self.height, self.width):
            frame = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        pad_h, pad_w = self._stream.height - self.height, self._stream.width - self.width
        if pad_h or pad_w:
            frame = cv2.copyMakeBorder(frame, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
        av_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        av_frame.pts = self._count
        av_frame.time_base = 1 / self._rate
        self._count += 1
        for packet in self._stream.encode(av_frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class H264Writer(VideoWriter):
    """Browser-playable H.264 MP4 (libx264, yuv420p, +faststart) at a given size and rate.

    Odd sizes are padded to even by one replicated row/column (4:2:0 needs even sizes);
    even sizes are kept exactly."""

    def __init__(self, path, width: int, height: int, fps, crf: int = 23, preset: str = "veryfast"):
        super().__init__(path, width, height, fps, codec="libx264", pix_fmt="yuv420p",
                         options={"crf": str(crf), "preset": preset})
