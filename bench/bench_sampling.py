#!/usr/bin/env python
"""Frame sampling: 16 uniform frames from a 60 s 1080p H.264 video, one sequential pass vs a seek per frame.

    python bench/bench_sampling.py                   # the full measurement (the video is made once, cached)
    python bench/bench_sampling.py --quick           # a 4 s 360p video, 1 timed run: checks the script

The video is generated with PyAV (libx264, yuv420p, ``--gop`` frames between keyframes, encoder default when
not given); every frame carries its own index as a row of black/white bars, so the bench can check which
frames each method returned. Two methods, each timed as warm-up runs then the median of ``--repeats``:

- ``video.sample_clip(path, T)`` (this project): probe, then one sequential decoding pass that stops after
  the last wanted frame, keeping only the wanted frames;
- the published approach: ``cv2.VideoCapture``, ``CAP_PROP_FRAME_COUNT``, then per index
  ``cap.set(CAP_PROP_POS_FRAMES, i)`` + ``cap.read()`` + BGR->RGB.

Prints the machine, the video's facts (size, frames, measured keyframe interval) and a table: seconds,
speed-up, which frame indices came back, and the max abs pixel difference between the two methods.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from bench import common

TARGET_FRACTION = 1 / 3     # issue 7: sequential in at most a third of the seek-per-frame time
BITS = 12                   # frame numbers up to 4095 drawn as bars
BAR_ROWS = 0.08             # the bars take the top 8% of the frame


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the generated video")
    p.add_argument("--height", type=int, default=1080, help="height of the generated video (width = 16:9)")
    p.add_argument("--fps", type=int, default=25, help="frame rate of the generated video")
    p.add_argument("--gop", type=int, default=None,
                   help="frames between keyframes (libx264 'g'); default: the encoder's own (250 for libx264)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly (T)")
    common.add_timing_args(p, "runs of each method", warmup=1, repeats=3)
    p.add_argument("--work_dir", default="/tmp/star_bench_sampling", help="where the generated video is cached")
    p.add_argument("--video", default=None, help="measure this video instead of a generated one (no index check)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 4 s of 360p, 1 timed run")
    return p


# --------------------------------------------------------------------------- the test video


def numbered_frame(background: np.ndarray, index: int, fps: int) -> np.ndarray:
    """``background`` with ``index`` drawn as BITS black/white bars on top and a moving block below."""
    frame = background.copy()
    h, w = frame.shape[:2]
    bar_h, bar_w = max(8, int(h * BAR_ROWS)), w // BITS
    for bit in range(BITS):
        value = 255 if (index >> bit) & 1 else 0
        frame[:bar_h, bit * bar_w:(bit + 1) * bar_w] = value
    side = h // 6
    x = int((index / fps) * w / 8) % (w - side)   # moves so consecutive frames differ (realistic P-frames)
    frame[h // 2:h // 2 + side, x:x + side] = (230, 200, 40)
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index drawn by ``numbered_frame`` (robust to compression: each bar is averaged)."""
    h, w = frame.shape[:2]
    bar_h, bar_w = max(8, int(h * BAR_ROWS)), w // BITS
    index = 0
    for bit in range(BITS):
        patch = frame[bar_h // 4:3 * bar_h // 4, bit * bar_w + bar_w // 4:(bit + 1) * bar_w - bar_w // 4]
        if patch.mean() > 128:
            index |= 1 << bit
    return index


def make_video(args) -> pathlib.Path:
    """Generate the test video once (cached by its parameters) and return its path."""
    import video_writer
    width = (args.height * 16 // 9) // 2 * 2
    gop = f"g{args.gop}" if args.gop else "gdefault"
    path = pathlib.Path(args.work_dir) / f"sampling_{args.height}p_{args.seconds:g}s_{args.fps}fps_{gop}.mp4"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(args.seconds * args.fps))
    if n >= 2 ** BITS:
        raise SystemExit(f"--seconds x --fps = {n} frames: at most {2 ** BITS - 1} can be numbered")
    ys, xs = np.mgrid[0:args.height, 0:width]
    background = np.stack([xs * 255 // width, ys * 255 // args.height, (xs + ys) * 127 // (width + args.height)],
                          -1).astype(np.uint8)
    options = {"crf": "23", "preset": "veryfast", **({"g": str(args.gop)} if args.gop else {})}
    tmp = path.with_suffix(".tmp.mp4")
    print(f"generating {path} ({n} frames {width}x{args.height}) ...", flush=True)
    with video_writer.VideoWriter(tmp, width, args.height, args.fps, codec="libx264", options=options) as writer:
        for i in range(n):
            writer.write(numbered_frame(background, i, args.fps))
    tmp.replace(path)   # a half-written video is never cached
    return path


def keyframe_interval(path) -> tuple[int, float]:
    """(number of keyframes, mean frames between them), from the packets (no decoding)."""
    import av
    with av.open(str(path)) as container:
        flags = [p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size]
    keys = max(sum(flags), 1)
    return keys, len(flags) / keys


# --------------------------------------------------------------------------- the two methods


def sample_sequential(path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """This project: ``video.sample_clip``; returns (frames, the indices it sampled)."""
    import video
    frames, info = video.sample_clip(path, num_frames)
    return frames, video.sample_indices(info.num_frames, num_frames)


def sample_seek_per_frame(path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The published code: OpenCV, container frame count, one seek + read per index, BGR->RGB."""
    import cv2
    cap = cv2.VideoCapture(str(path))
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        indices = np.linspace(0, total - 1, num_frames).astype(int)
        frames = []
        for idx in indices:
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(idx))
            ok, frame = cap.read()
            if not ok:
                raise RuntimeError(f"{path}: OpenCV could not read frame {idx}")
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    return np.stack(frames), indices


METHODS = {"sequential pass (video.sample_clip)": sample_sequential,
           "seek per frame (published, OpenCV)": sample_seek_per_frame}


def index_check(frames: np.ndarray, indices: np.ndarray) -> str:
    """How many returned frames carry the index they were asked for (the drawn bars)."""
    got = [read_index(f) for f in frames]
    right = sum(int(g == i) for g, i in zip(got, indices, strict=True))
    wrong = [f"{i}->{g}" for g, i in zip(got, indices, strict=True) if g != i][:3]
    return f"{right}/{len(indices)}" + (f" (asked->got {', '.join(wrong)})" if wrong else "")


def print_agreement(sequential, seek) -> None:
    """Whether both methods asked for the same indices, and how far apart their pixels are."""
    (seq_frames, seq_idx), (seek_frames, seek_idx) = sequential, seek
    same = "yes" if np.array_equal(seq_idx, seek_idx) else f"no ({seq_idx.tolist()} vs {seek_idx.tolist()})"
    if seq_frames.shape == seek_frames.shape:
        diff = str(int(np.abs(seq_frames.astype(np.int16) - seek_frames.astype(np.int16)).max()))
    else:
        diff = f"shapes differ ({seq_frames.shape} vs {seek_frames.shape})"
    print(f"\nsame indices: {same}; max abs pixel difference between the methods: {diff}")


def main(args) -> int:
    if args.quick:
        args.seconds, args.height, args.warmup, args.repeats = 4.0, 360, 1, 1
    path = pathlib.Path(args.video) if args.video else make_video(args)
    import video
    info = video.probe_video(path)
    keys, interval = keyframe_interval(path)
    print(f"# frame sampling: {args.frames} uniform frames, warm-up {args.warmup}, median of {args.repeats}"
          + (" (QUICK: figures meaningless)" if args.quick else ""))
    common.print_machine()
    print(f"video: {path}: {info.width}x{info.height}, {info.num_frames} frames, {info.fps:g} fps, "
          f"{info.duration_sec:.1f} s, {keys} keyframes (one every {interval:.0f} frames)\n")
    outputs, times = {}, {}
    for name, method in METHODS.items():
        print(f"--- {name}", flush=True)

        def run(method=method):
            outputs[method] = method(path, args.frames)   # the last run's frames are compared below

        times[name] = common.time_runs(run, args.warmup, args.repeats)
    seq_name, seek_name = METHODS
    seek_t = common.median(times[seek_name])
    rows = []
    for name, method in METHODS.items():
        frames, indices = outputs[method]
        t = common.median(times[name])
        check = "n/a" if args.video else index_check(frames, indices)
        rows.append([name, f"{t:.3f}", common.spread(times[name]), f"{t / seek_t:.2f}", check])
    print()
    print(common.markdown_table(
        ["method", "seconds", "min-max", "time / seek-per-frame time", "frames with the right index"], rows))
    print_agreement(outputs[sample_sequential], outputs[sample_seek_per_frame])
    fraction = common.median(times[seq_name]) / seek_t
    verdict = "met" if fraction <= TARGET_FRACTION else "not met"
    print(f"sequential / seek-per-frame = {fraction:.2f} (target <= {TARGET_FRACTION:.2f}: {verdict}); "
          f"speed-up {1 / fraction:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
