#!/usr/bin/env python
"""Make a small synthetic action dataset in exactly the training layout.

    python tools/make_sample_data.py --output_dir sample_data [--num_videos 48 --seed 0]
    python tools/make_sample_data.py --output_dir sample_tubes --per_frame   # per-frame labels

What the videos and labels hold: synthetic_data.py, which makes them.
"""
from __future__ import annotations

import argparse
import sys
import time

import video
from synthetic_data import ACTIONS, make_sample_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="sample_data", help="dataset folder to write (default: sample_data)")
    p.add_argument("--num_videos", type=int, default=48, help="number of videos (default 48)")
    p.add_argument("--num_frames", type=int, default=None,
                   help="frames of the longest video (lengths vary 80-100%%; default 80, 150 with --per_frame)")
    p.add_argument("--width", type=int, default=160, help="frame width in pixels")
    p.add_argument("--height", type=int, default=120, help="frame height in pixels")
    p.add_argument("--fps", type=float, default=25, help="frame rate")
    p.add_argument("--seed", type=int, default=0, help="everything is a function of the seed")
    p.add_argument("--num_classes", type=int, default=3, help=f"first N of {', '.join(ACTIONS)}")
    p.add_argument("--classes", default=None, help="comma-separated subset of the actions, overrides --num_classes")
    p.add_argument("--negative_fraction", type=float, default=1 / 3, help="share of videos without action")
    p.add_argument("--two_actor_fraction", type=float, default=0.25, help="share of positives with two actors")
    p.add_argument("--per_frame", action="store_true",
                   help="per-frame tube labels: actors drift across the frame and act for part of the video")
    p.add_argument("--label_step", type=int, default=1,
                   help="with --per_frame: label every N-th acting frame only (sparse keyframes; default 1)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_sample_dataset(
            args.output_dir, args.num_videos, args.num_frames, args.width, args.height, args.fps, args.seed,
            args.num_classes, args.classes.split(",") if args.classes else None,
            args.negative_fraction, args.two_actor_fraction, args.per_frame, args.label_step)
    except (ValueError, video.VideoError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['videos']} videos ({summary['positives']} with action, {summary['two_actor']} "
          f"with two actors, {summary['negatives']} without) to {summary['root']} in "
          f"{time.perf_counter() - start:.1f} s; classes: {', '.join(summary['class_names'])}"
          + (f"; per-frame labels, {summary['frame_folders']} video(s) as frame folders" if args.per_frame else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
