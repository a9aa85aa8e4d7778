#!/usr/bin/env python
"""Save one annotated frame as a PNG: the middle frame of the annotated video whose detection
scored highest in predictions.csv (for the README's picture and a quick look at results).

    python tools/snapshot.py --predictions predictions.csv --annotated_dir annotated_videos --output frame.png
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import cv2
import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import video  # noqa: E402


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
    frame = video.read_frames(path, [info.num_frames // 2], info)[0]
    frame = cv2.resize(frame, (frame.shape[1] * 3, frame.shape[0] * 3), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(args.output, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    print(f"{args.output}: middle frame of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
