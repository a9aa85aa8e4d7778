#!/usr/bin/env python
"""Save one annotated frame as a PNG: the middle of the best-scored detection's time span in its annotated
video (predictions.csv), for the README's picture and a quick look at results.

    python tools/snapshot.py --predictions predictions.csv --annotated_dir annotated_videos --output frame.png
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import cv2
import pandas as pd

import video


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="predictions.csv written by test.py")
    p.add_argument("--annotated_dir", required=True, help="folder of annotated videos written by test.py")
    p.add_argument("--output", required=True, help="PNG file to write")
    return p


def main(args) -> int:
    table = pd.read_csv(args.predictions)
    found = table[table["pred_class"] != "no_object"].sort_values("score", ascending=False)
    if found.empty:
        print(f"{args.predictions}: no detection to show", file=sys.stderr)
        return 1
    stem = pathlib.Path(str(found.iloc[0]["video_name"])).stem
    path = pathlib.Path(args.annotated_dir) / f"{stem}.mp4"
    info = video.probe_video(path)
    best = found.iloc[0]
    middle = (float(best["start_sec"]) + float(best["end_sec"])) / 2 if "start_sec" in best else info.duration_sec / 2
    index = min(max(int(middle * info.fps), 0), info.num_frames - 1)   # the middle of the best detection's span
    frame = video.read_frames(path, [index], info)[0]
    frame = cv2.resize(frame, (frame.shape[1] * 3, frame.shape[0] * 3), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(args.output, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    print(f"{args.output}: frame {index} of {path}, the middle of its best detection")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
