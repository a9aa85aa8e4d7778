#!/usr/bin/env python
"""The reference inference job and its measurement.

    python bench/inference_job.py --work_dir /tmp/star_bench [--videos 8 --frames 150] [-- extra test.py flags]

Makes (once) ``--videos`` H.264 videos of 640x360 with ``--frames`` frames each and a published-size
random-weights raw ``state_dict`` (2 classes), then runs ``test.py`` on them in a child process and
prints its wall-clock seconds and peak RSS (the largest of the process and its decoding workers).
The issue's figures for the published code on this job: 26.5 s, 5.0 GB.
"""
from __future__ import annotations

import argparse
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_videos(folder: pathlib.Path, count: int, frames: int, width=640, height=360, fps=25) -> None:
    import video
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        path = folder / f"video_{k:02d}.mp4"
        if path.exists():
            continue
        background = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
        with video.H264Writer(path, width, height, fps) as writer:
            for i in range(frames):
                frame = background.copy()
                x = (i * 3 + 40 * k) % (width - 80)
                frame[100:220, x:x + 80] = (230, 200, 40)   # a moving "actor"
                writer.write(frame)


def make_checkpoint(path: pathlib.Path) -> None:
    if path.exists():
        return
    import torch
    from model import STAR
    torch.manual_seed(0)
    torch.save(STAR(2).state_dict(), path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/star_bench", help="where the job's videos and outputs go")
    parser.add_argument("--videos", type=int, default=8, help="number of videos")
    parser.add_argument("--frames", type=int, default=150, help="frames per video (640x360, 25 fps)")
    parser.add_argument("extra", nargs="*", help="extra test.py flags (after --)")
    return parser


def main(args) -> None:
    work = pathlib.Path(args.work_dir)
    make_videos(work / "videos", args.videos, args.frames)
    make_checkpoint(work / "best_model.pth")
    cmd = [sys.executable, str(ROOT / "test.py"), "--input_dir", str(work / "videos"),
           "--output_file", str(work / "out" / "predictions.csv"), "--model_path", str(work / "best_model.pth"),
           *args.extra]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"inference job: rc {rc}, {seconds:.1f} s end to end, peak RSS {peak_mb:.0f} MB "
          f"({args.videos} videos x {args.frames} frames 640x360)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
