#!/usr/bin/env python
"""Make videos cheaper to load: a lower-resolution H.264 copy, or a folder of JPEG frames.

    python tools/transcode_videos.py DATASET --output DATASET_360 --height 360   # a whole dataset, boxes scaled
    python tools/transcode_videos.py DATASET --output DATASET_frames --frames    # frame folders, labels as they are
    python tools/transcode_videos.py long.mp4 --output long_360.mp4 --height 360 # one video

Why: a training clip decodes its window (from the keyframe before it) at the file's full resolution and then
shrinks it to 112 or 224 pixels; at 1080p most of a loader worker's time is that decoding (bench/bench_loading.py).
A copy at a few times the training size, or frames as JPEG files (read only the ones a clip shows), loads several
times faster. Frame numbers are kept (frame i of the copy is frame i of the source), so per-frame labels still fit;
a dataset's label boxes, in pixels, are scaled with the frames. Frame folders play at ``main.py --fps`` (25 by
default): give it the source's rate if that differs.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import shutil
import sys

import cv2

import video
import video_writer
from files import atomic_write
from runtime import EXIT_USAGE, UsageError, number, one_line

DATASET_CSV = "action_challenge.csv"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a video file or a dataset folder (with action_challenge.csv)")
    p.add_argument("--output", required=True, help="the copy: a video path, a frame folder, or a dataset folder")
    p.add_argument("--height", type=number(int, 16), default=None,
                   help="height of the copy in pixels (width keeps the aspect, even); default: the source's")
    p.add_argument("--frames", action="store_true", help="write JPEG frames (00001.jpg, ...) instead of H.264")
    p.add_argument("--quality", type=number(int, 1, maximum=100), default=92, help="JPEG quality of --frames")
    p.add_argument("--max_seconds", type=number(float, 0, strict=True), default=None,
                   help="copy only this many seconds from the start of each video")
    return p


def scaled_size(width: int, height: int, target: int | None) -> tuple[int, int]:
    """``(width, height)`` at ``target`` height (None: unchanged), both even (H.264's 4:2:0)."""
    if target is None:
        return width, height
    return max(2, round(width * target / height / 2) * 2), max(2, target // 2 * 2)


def transcode(source: pathlib.Path, output: pathlib.Path, height: int | None, frames: bool, quality: int = 92,
              max_seconds: float | None = None) -> float:
    """Copy one video; returns the factor its boxes scale by (copy height / source height)."""
    info = video.probe_video(source, count_frames=False)
    width, new_height = scaled_size(info.width, info.height, height)
    limit = int(max_seconds * info.fps) if max_seconds else None
    if frames:
        output.mkdir(parents=True, exist_ok=True)
    writer = None if frames else video_writer.H264Writer(output, width, new_height, info.fps, crf=18)
    try:
        for i, frame in enumerate(video.iter_frames(source)):
            if limit is not None and i >= limit:
                break
            if frame.shape[:2] != (new_height, width):
                frame = cv2.resize(frame, (width, new_height), interpolation=cv2.INTER_AREA)
            if frames:
                cv2.imwrite(str(output / f"{i + 1:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
            else:
                writer.write(frame)
    finally:
        if writer is not None:
            writer.close()
    return new_height / info.height


def scale_label_file(source: pathlib.Path, output: pathlib.Path, factor: float) -> None:
    """A label file with its pixel boxes (the last four numbers of each line) times ``factor``."""
    lines = []
    for line in source.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if len(tokens) in (5, 7) and factor != 1.0:
            tokens[-4:] = [f"{float(t) * factor:.2f}" for t in tokens[-4:]]
        lines.append(" ".join(tokens))
    with atomic_write(output) as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))


def transcode_dataset(source: pathlib.Path, output: pathlib.Path, args) -> int:
    """Every video of a dataset (its CSV's rows), labels scaled and copied, classes.txt copied; returns failures."""
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(source / DATASET_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out_rows = [header]
    for row in body:
        if not row or not row[0]:
            continue
        video_rel = pathlib.Path(row[0])
        new_rel = video_rel.with_suffix("") if args.frames else video_rel.with_suffix(".mp4")
        try:
            factor = transcode(source / video_rel, output / new_rel, args.height, args.frames, args.quality,
                               args.max_seconds)
        except (video.VideoError, OSError) as err:
            print(f"{source / video_rel}: skipped ({one_line(err)})", file=sys.stderr)
            failures += 1
            continue
        if len(row) > 1 and row[1]:
            (output / row[1]).parent.mkdir(parents=True, exist_ok=True)
            scale_label_file(source / row[1], output / row[1], factor)
        out_rows.append([str(new_rel), *row[1:]])
        print(f"{video_rel} -> {new_rel}", flush=True)
    if (source / "classes.txt").exists():
        shutil.copyfile(source / "classes.txt", output / "classes.txt")
    with atomic_write(output / DATASET_CSV) as f:
        csv.writer(f, lineterminator="\n").writerows(out_rows)
    return failures


def main(args) -> int:
    source, output = pathlib.Path(args.source), pathlib.Path(args.output)
    try:
        if (source / DATASET_CSV).is_file():
            failures = transcode_dataset(source, output, args)
            print(f"{output}: the dataset, {failures} video(s) skipped")
            return 1 if failures else 0
        if not video.is_video_input(source):
            raise UsageError(f"{source}: neither a video nor a dataset folder with {DATASET_CSV}")
        transcode(source, output, args.height, args.frames, args.quality, args.max_seconds)
        print(f"{source} -> {output}")
        return 0
    except (UsageError, video.VideoError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
