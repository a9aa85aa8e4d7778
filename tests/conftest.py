"""Shared test helpers: tiny synthetic videos written with PyAV, and the real-media folder.

``write_video(path, frames, fps, codec)`` writes RGB frames; ``numbered_frames(n, w, h)``
makes frames whose pixels encode their own index (read back with ``frame_number``), so a
test can check exactly which frames a decoder returned, even after lossy compression.
"""
from __future__ import annotations

import fractions
import pathlib
import socket

import av
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

MEDIA_DIR = ROOT.parent / "shared" / "media"

# codec name -> pixel format it needs (all present in PyAV's bundled FFmpeg)
PIX_FMT = {"libx264": "yuv420p", "mpeg4": "yuv420p", "mjpeg": "yuvj420p",
           "libvpx-vp9": "yuv420p", "rawvideo": "bgr24"}
_BITS = 8  # frame numbers up to 255


def numbered_frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 frames; frame i shows i in binary as 8 black/white vertical bars."""
    bar = width // _BITS
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        for b in range(_BITS):
            if (i >> b) & 1:
                frames[i, :, b * bar:(b + 1) * bar] = 255
    return frames


def frame_number(frame: np.ndarray) -> int:
    """Inverse of :func:`numbered_frames` for a decoded frame (robust to compression noise)."""
    width = frame.shape[1]
    bar = width // _BITS
    value = 0
    for b in range(_BITS):
        centre = frame[:, b * bar + bar // 4:(b + 1) * bar - bar // 4]
        if centre.mean() > 127:
            value |= 1 << b
    return value


def write_video(path, frames, fps=25, codec: str = "libx264") -> pathlib.Path:
    """Write RGB ``frames`` (N, H, W, 3) uint8 to ``path`` (container from the suffix).

    Near-lossless settings so pixel-level checks hold; N may be 0 (container with no frames)."""
    path = pathlib.Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    h, w = (frames.shape[1:3] if frames.ndim == 4 and len(frames) else (48, 64))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(10000))
        stream.width, stream.height, stream.pix_fmt = w, h, PIX_FMT[codec]
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        elif codec in ("mpeg4", "mjpeg", "libvpx-vp9"):
            stream.bit_rate = 4_000_000  # generous for tiny frames: keeps the bars crisp
        container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_video(tmp_path):
    """Factory fixture: ``make_video(name, n=20, width=64, height=48, fps=25, codec="libx264",
    frames=None)`` writes a numbered test video under tmp_path and returns its path."""

    def factory(name="clip.mp4", n=20, width=64, height=48, fps=25, codec="libx264", frames=None):
        frames = numbered_frames(n, width, height) if frames is None else frames
        return write_video(tmp_path / name, frames, fps=fps, codec=codec)

    return factory


@pytest.fixture
def media_dir():
    """The real footage folder (../shared/media); tests using it skip when it is absent."""
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"real test footage not present at {MEDIA_DIR}")
    return MEDIA_DIR


# --------------------------------------------------------------------------- shared helpers of the CLI tests

TINY_PREP = {"num_frames": 4, "img_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def tiny_checkpoint(path, confident: bool = False, net=None) -> pathlib.Path:
    """A tiny project checkpoint (TINY_PREP, classes fight and collapse); ``confident``: its 12 queries all say class 1
    (collapse) with probability ~1, else random weights (scores ~0.3-0.5). ``net``: a ``STAR(2)`` whose weights to
    use instead of those seeded here (tests/test_golden.py seeds each weight by its key)."""
    import torch
    import checkpoint
    import model as star_model
    if net is None:
        torch.manual_seed(0)
        net = star_model.STAR(2).eval()
    if confident:
        with torch.no_grad():
            bias = net.head.class_head[3].bias
            bias.zero_()
            bias[1] = 20.0
    ck = checkpoint.make_checkpoint(net, checkpoint.model_args_from(2), ["fight", "collapse"], TINY_PREP,
                                    raw_class_ids=[0, 1])
    checkpoint.save_checkpoint(ck, path)
    return pathlib.Path(path)


TUBE_CKPT_ARGS = {"num_queries": 4, "tube_steps": 8, "dim_feedforward": 64, "num_decoder_layers": 2,
                  "max_positions": 1000}


def tube_checkpoint(path, acting: bool = True, net=None) -> pathlib.Path:
    """A tiny tube-mode STAR (8 frames, 4 queries) whose every step says collapse; ``acting``: its actionness map says
    acting everywhere (4 tubes over the whole clip), else nowhere (no tube). ``net``: a ``STAR(2, **TUBE_CKPT_ARGS)``
    whose weights to use instead of those seeded here."""
    import torch
    import checkpoint
    import model as star_model
    args = TUBE_CKPT_ARGS
    if net is None:
        torch.manual_seed(0)
        net = star_model.STAR(2, **args).eval()
    with torch.no_grad():
        net.head.class_head[3].bias.zero_()
        net.head.class_head[3].bias[1] = 20.0
        net.acting.out.weight.zero_()      # the actionness map: acting everywhere (or nowhere)
        net.acting.out.bias.fill_(20.0 if acting else -20.0)
    ck = checkpoint.make_checkpoint(net, checkpoint.model_args_from(2, **args), ["fight", "collapse"],
                                    {**TINY_PREP, "num_frames": 8})
    checkpoint.save_checkpoint(ck, path)
    return pathlib.Path(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoadCalled(Exception):
    """Raised by a stand-in model loader: the CLI went on to load the model."""


def refuse_load(*_args, **_kwargs):
    raise LoadCalled("the model was loaded")
