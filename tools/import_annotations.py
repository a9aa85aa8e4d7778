#!/usr/bin/env python
"""Import other datasets' action annotations into STAR's dataset layout (per-frame labels).

    python tools/import_annotations.py --format {ucf24,jhmdb,ava,cvat} --annotations FILE [FILE ...]
        --videos DIR --output_dir DATASET [--split train|test|all] [--label_map FILE] [--fps F]

Writes ``DATASET/action_challenge.csv``, one label file per video under ``DATASET/labels/`` with
lines ``<frame> <track_id> <class_id> <x1> <y1> <x2> <y2>`` (0-based frame, pixel xyxy, the boxes
as annotated) and ``DATASET/classes.txt``. Videos are not copied: the CSV names them where they
are (relative to DATASET when inside it, else by absolute path). A video is found in --videos by
the annotation's key: a video file of that name or stem, or a folder of numbered frames
(``<class>/<video>/00001.jpg`` for UCF101-24 and JHMDB). Keys without a video are named and skipped.

AVA: frame = round((timestamp - offset) * fps) with the video's own rate (or --fps) and
--ava_offset: ``auto`` (default) takes 0 when the video is long enough to hold its latest
timestamp (the full movie), else 900 (AVA's 15-minute clips cut at second 900, as SlowFast and
MMAction2 use them). Readers: annotations.py.
"""
from __future__ import annotations

import argparse
import csv
import errno
import os
import pathlib
import re
import sys

import annotations as ann
import video
from files import atomic_write
from runtime import UsageError, one_line

AVA_CLIP_START = 900.0  # AVA v2.x annotates seconds 900-1800 of each movie
NAME_BYTES = 200  # a label file's folder and file names are cut to this (file systems take 255 bytes a name)
SHOWN_KEY = 80  # characters of an annotation's video key in a message (a key may be thousands long)


def _stem(name: str) -> str:
    """A file name without its video extension (other names unchanged: frame folders)."""
    return name[: -len(pathlib.PurePath(name).suffix)] if video.is_video_file(name) else name


def find_video(videos_dir: pathlib.Path, key: str, listings: dict) -> pathlib.Path | None:
    """The video of ``key`` in ``videos_dir``: a video file or numbered-frame folder named ``key``
    (or its last part), or one whose stem is that name without a video extension. ``listings``
    caches each folder's entries by stem (one listing per folder however many keys)."""
    rel = key.replace("\\", "/").strip("/")
    for name in dict.fromkeys([rel, rel.rsplit("/", 1)[-1]]):
        if not name or ".." in name.split("/"):
            continue
        cand = videos_dir / name
        try:
            if cand.is_file() and video.is_video_file(cand) or video.is_frame_folder(cand):
                return cand
        except OSError:
            continue  # a name the file system cannot hold (too long) names no video
        if cand.parent not in listings:
            by_stem: dict[str, list] = {}
            try:
                for entry in sorted(cand.parent.iterdir()) if cand.parent.is_dir() else []:
                    by_stem.setdefault(_stem(entry.name), []).append(entry)
            except OSError:
                pass  # an unreadable folder holds no video we can use
            listings[cand.parent] = by_stem
        for entry in listings[cand.parent].get(_stem(cand.name), []):
            if entry.is_file() and video.is_video_file(entry) or video.is_frame_folder(entry):
                return entry
    return None


def video_info(path: pathlib.Path, fps: float | None) -> tuple[int, int, int, float]:
    """``(width, height, num_frames, fps)`` of a video file (the container's frame count) or a frame
    folder (at ``fps``, default video.DEFAULT_FOLDER_FPS); ``fps`` also overrides a file's own rate.
    Raises video.VideoError when it cannot be read."""
    info = video.probe_video(path, count_frames=False, fps=fps)
    return info.width, info.height, info.num_frames, fps or info.fps


def label_name(key: str, taken: set) -> str:
    """``labels/<key>.txt`` made safe: the key's folders kept, odd characters replaced, no ``..``."""
    parts = [re.sub(r"[^\w.\-]", "_", p) for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = parts or ["video"]
    if video.is_video_file(parts[-1]):
        parts[-1] = parts[-1].rsplit(".", 1)[0]
    parts = [p.encode()[:NAME_BYTES].decode("utf-8", "ignore") for p in parts]  # a name the file system takes
    base, n = "labels/" + "/".join(parts), 1
    name = base + ".txt"
    while name in taken:
        n += 1
        name = f"{base}_{n}.txt"
    taken.add(name)
    return name


def shown(key: str) -> str:
    """``key`` for a message: its start and its length when it is long."""
    return key if len(key) <= SHOWN_KEY else f"{key[:SHOWN_KEY]}... ({len(key)} characters)"


def write_labels(path: pathlib.Path, rows) -> bool:
    """Write one video's label lines; False when the path is longer than the file system takes (the video is
    skipped), UsageError naming the file for any other failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.writelines(f"{r[0]} {r[1]} {r[2]} {' '.join(_num(v) for v in r[3:])}\n" for r in rows)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise UsageError(f"{path}: cannot write the label file ({one_line(exc, path)})") from None
    return True


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def read(args) -> ann.Annotations:
    """The annotations the command line names (FormatError for a file of another format)."""
    label_map = ann.read_label_map(args.label_map) if args.label_map else None
    if args.format in ("ucf24", "jhmdb"):
        if len(args.annotations) != 1:
            raise UsageError(f"--format {args.format} reads one ground-truth pickle, got {len(args.annotations)} files")
        return ann.read_act_pickle(args.annotations[0], args.split, args.split_number - 1, label_map)
    if args.split != "all":
        raise UsageError(f"--split applies to the ucf24/jhmdb pickles; for {args.format} pass the split's own files")
    if args.format == "ava":
        return ann.read_ava(args.annotations, label_map)
    return ann.read_cvat(args.annotations, label_map)


def video_rows(data: ann.Annotations, rows, info, ava_offset: str) -> list:
    """Rows of one video in frames and pixels, without duplicates, sorted."""
    width, height, num_frames, fps = info
    if data.timestamps:
        if ava_offset == "auto":
            latest = max(r[0] for r in rows)
            offset = 0.0 if latest * fps < num_frames else AVA_CLIP_START
        else:
            offset = float(ava_offset)
        rows = ann.ava_rows_to_frames(rows, fps, offset, width, height)
    return sorted(set(rows))


def import_dataset(args, say=print) -> dict:
    """Read, find the videos, write the dataset; ``say`` gets each skipped key or dropped line as it
    comes. Returns the counts."""
    videos_dir, out = pathlib.Path(args.videos), pathlib.Path(args.output_dir)
    if not videos_dir.is_dir():
        raise UsageError(f"--videos {videos_dir}: not a folder")
    data = read(args)
    for note in data.notes:
        say(note)
    csv_rows, used, taken, listings = [], set(), set(), {}
    skipped = rows_written = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output_dir {out}: cannot create it ({exc.strerror or exc})") from None
    out_abs = out.resolve()
    for key in sorted(data.videos):
        path = find_video(videos_dir, key, listings)
        if path is None:
            say(f"{shown(key)}: no video of that name in {videos_dir}; skipped")
            skipped += 1
            continue
        try:
            info = video_info(path, args.fps)
        except video.VideoError as exc:
            say(f"{shown(key)}: {path} cannot be read ({one_line(exc, path)}); skipped")
            skipped += 1
            continue
        rows = video_rows(data, data.videos[key], info, args.ava_offset)
        inside = [r for r in rows if 0 <= r[0] < info[2]]
        if len(inside) < len(rows):
            say(f"{shown(key)}: {len(rows) - len(inside)} line(s) outside its {info[2]} frames dropped")
        if not inside:
            say(f"{shown(key)}: no annotation inside the video; skipped")
            skipped += 1
            continue
        label_rel = label_name(key, taken)
        if not write_labels(out / label_rel, inside):
            say(f"{shown(key)}: its label file's path is longer than the file system takes; skipped")
            skipped += 1
            continue
        path_abs = path.resolve()
        inside_out = path_abs.is_relative_to(out_abs)  # relative inside the dataset: the folder can move
        video_rel = path_abs.relative_to(out_abs).as_posix() if inside_out else os.fspath(path_abs)
        csv_rows.append((video_rel, label_rel))
        used.update(r[2] for r in inside)
        rows_written += len(inside)
    if not csv_rows:
        raise UsageError(f"nothing written: none of the {len(data.videos)} annotated videos was found in {videos_dir}")
    with atomic_write(out / "action_challenge.csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_file", "label_file"])
        writer.writerows(csv_rows)
    with atomic_write(out / "classes.txt") as f:
        f.writelines(f"{data.class_names.get(c, f'action_{c}')}\n" for c in sorted(used))
    return {"videos": len(csv_rows), "rows": rows_written, "skipped": skipped, "classes": len(used),
            "output_dir": os.fspath(out)}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=("ucf24", "jhmdb", "ava", "cvat"))
    p.add_argument("--annotations", required=True, nargs="+", help="ucf24/jhmdb: the GT pickle; ava: CSV file(s); "
                   "cvat: one XML per video")
    p.add_argument("--videos", required=True, help="folder holding the videos (files or numbered-frame folders)")
    p.add_argument("--output_dir", required=True, help="dataset folder to write")
    p.add_argument("--split", default="all", choices=("train", "test", "all"), help="ucf24/jhmdb: which videos")
    p.add_argument("--split_number", type=int, default=1, choices=(1, 2, 3),
                   help="ucf24/jhmdb: which of the pickle's splits (JHMDB has 3, UCF101-24 one; default 1)")
    p.add_argument("--label_map", help="AVA pbtxt, or a text file of '<id> <name>' / '<name>' lines: the classes "
                   "to keep and their ids (others skipped)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of frame folders (default 25); for ava, "
                   "used instead of each video's own rate")
    p.add_argument("--ava_offset", default="auto", help="ava: second of the movie at which the video files start "
                   "(auto: 0 for full movies, 900 for the 15-minute clips)")
    return p


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.ava_offset != "auto" and not re.fullmatch(r"\s*-?\d+(\.\d*)?\s*", args.ava_offset):
        parser.error(f"--ava_offset must be 'auto' or a number of seconds, got {args.ava_offset!r}")
    try:
        summary = import_dataset(args)
    except (UsageError, OSError) as err:   # OSError: writing the CSV or classes.txt (a full disk...), one_line names it
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {summary['videos']} videos, {summary['rows']} label lines, {summary['classes']} classes to "
          f"{summary['output_dir']}; {summary['skipped']} annotated video(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
