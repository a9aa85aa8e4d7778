#!/usr/bin/env python
"""Data loading: clips/s one loader worker cuts from long videos (how many workers keep one GPU fed).

    python bench/bench_loading.py              # a 10-min 1080p H.264 file (made once, cached), 8x112 and 16x224
    python bench/bench_loading.py --quick      # a 20-s 320x180 file: checks the script

What one worker does per training clip (``dataset.ActionDataset`` with augmentation): pick a window where the actor
acts, decode its frames, crop/flip/colour, resize, normalise, build the targets. Sources, all of the same footage:
the H.264 file, the same re-encoded at a lower height (``tools/transcode_videos.py --height``) and a folder of JPEG
frames (``--frames``; only its first ``--folder_minutes``, since a folder's cost per clip does not grow with its
length). A worker's clips/s times the workers is what the loader gives; a GPU step that takes S seconds for a batch of
B clips needs ``B / S`` clips/s (bench/README.md).
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import numpy as np

import video
import video_writer
from bench import common
from dataset import ActionDataset
from records import load_dataset

CLASSES = ("walk",)
CONFIGS = ((8, 112), (16, 224))   # (frames, size) per clip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the long video")
    p.add_argument("--height", type=int, default=1080, help="its height (16:9)")
    p.add_argument("--low_height", type=int, default=360, help="height of the lower-resolution copy")
    p.add_argument("--folder_minutes", type=float, default=1.0, help="minutes of frames in the frame folder")
    p.add_argument("--clips", type=int, default=12, help="clips timed per source and size")
    p.add_argument("--work_dir", default="/tmp/star_bench_loading", help="where the videos are made (kept for reuse)")
    p.add_argument("--quick", action="store_true", help="a 20-s 320x180 video, 3 clips: checks the script")
    return p


def write_long_video(path: pathlib.Path, seconds: float, height: int, fps: int = 25) -> None:
    """A textured scene with a walking box, H.264 (x264 defaults: a keyframe every 250 frames)."""
    width = height * 16 // 9 // 2 * 2
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (height // 8, width // 8, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    background = np.ascontiguousarray(background[:height, :width])
    with video_writer.H264Writer(path, width, height, fps) as writer:
        for i in range(int(seconds * fps)):
            frame = background.copy()
            x = int((i * 3) % (width - height // 4))
            frame[height // 3: height // 3 + height // 3, x: x + height // 8] = (220, 40, 40)
            writer.write(frame)


def write_dataset(folder: pathlib.Path, video: pathlib.Path, num_frames: int, width: int, height: int) -> None:
    """A one-video per-frame dataset: one actor acting over the whole video, labelled every 25th frame."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    box = (width // 4, height // 4, width // 2, height * 3 // 4)
    lines = [f"{f} 0 0 {box[0]} {box[1]} {box[2]} {box[3]}" for f in range(0, num_frames, 25)]
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    (folder / "action_challenge.csv").write_text(f"video_file,label_file\n{video},labels.txt\n")


def make_sources(args) -> dict[str, pathlib.Path]:
    """The long file, its lower-resolution copy and a frame folder (each made once; tools/transcode_videos.py makes
    the last two, as a user would)."""
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    long = work / f"long_{args.minutes:g}min_{args.height}p.mp4"
    if not long.exists():
        print(f"making {long} ({args.minutes:g} min at {args.height}p; minutes on 2 cores)...", flush=True)
        partial = long.with_suffix(".part.mp4")
        write_long_video(partial, args.minutes * 60, args.height)
        partial.replace(long)
    low = work / f"{long.stem}_{args.low_height}p.mp4"
    frames = work / f"{long.stem}_frames"
    tool = [sys.executable, str(common.ROOT / "tools" / "transcode_videos.py")]
    if not low.exists():
        subprocess.run([*tool, str(long), "--output", str(low), "--height", str(args.low_height)], check=True)
    if not frames.exists():
        subprocess.run([*tool, str(long), "--output", str(frames), "--frames",
                        "--max_seconds", str(args.folder_minutes * 60)], check=True)
    return {f"H.264 {args.height}p": long, f"H.264 {args.low_height}p": low, f"JPEG frames {args.height}p": frames}


def clips_per_second(source: pathlib.Path, frames: int, size: int, clips: int, work: pathlib.Path) -> float:
    """Clips/s of ActionDataset's training clips (augmented windows) from ``source``, in this process."""
    info = video.probe_video(source, count_frames=False)
    folder = work / f"dataset_{source.name}"
    write_dataset(folder, source.resolve(), info.num_frames, info.width, info.height)
    records, _, problems = load_dataset(folder)
    if not records:
        raise SystemExit(f"{source}: the benchmark's dataset did not load: {problems}")
    window_sec = 4 * frames / info.fps   # main.py's default window for per-frame labels
    dataset = ActionDataset(records, frames, size, augment=True, seed=0, clips_per_video=clips + 1,
                            window_sec=window_sec)
    dataset[(0, 0)]   # warm-up: imports, the decoder's first open
    start = time.perf_counter()
    for i in range(1, clips + 1):
        dataset[(i, 1)]
    return clips / (time.perf_counter() - start)


def main(args) -> int:
    if args.quick:
        args.minutes, args.height, args.low_height, args.folder_minutes, args.clips = 1 / 3, 180, 90, 1 / 6, 3
        args.work_dir = args.work_dir + "_quick"
    common.print_machine("cpu")
    sources = make_sources(args)
    rows = []
    for (frames, size) in CONFIGS:
        for name, path in sources.items():
            rate = clips_per_second(path, frames, size, args.clips, pathlib.Path(args.work_dir))
            rows.append([f"{frames}x{size}", name, f"{rate:.2f}", f"{1 / rate:.2f}"])
    print(f"One process (= one loader worker), {args.clips} training clips each, windows anywhere in a "
          f"{args.minutes:g}-min video:\n")
    print(common.markdown_table(["clip", "source", "clips/s", "s/clip"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
