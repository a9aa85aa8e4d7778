"""The dataset folder read for training (``action_challenge.csv``, videos, label files, ``classes.txt``): the
records made of it (:class:`VideoRecord`, its :class:`Track` tubes), :func:`load_dataset`, which checks every
row, video and label line and lists what it skips or corrects, and the train/validation split.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib

import numpy as np

import files
import video
from labels import (ClassMap, FrameInstance, Instance, box_warnings, build_class_map, normalise_box,
                    parse_label_file)
from problems import SKIPPED, WARNING, DatasetError, Problem

CSV_NAME = "action_challenge.csv"
CLASSES_NAME = "classes.txt"

# A track jumps when its box centre moves more than max(1, gap / JUMP_FRAMES) box diagonals
# between two consecutive annotated frames `gap` frames apart (a person moves far less than one
# body diagonal a frame; a swapped track id or a typo moves any distance).
JUMP_FRAMES = 4
# At most this many problems of one kind per file are listed; the rest are counted in one line
# (a per-frame file of a wrong frame rate would otherwise list thousands of lines).
MAX_PROBLEMS_PER_KIND = 10


@dataclasses.dataclass
class Track:
    """One actor's annotated frames in one video (a tube), as read from per-frame lines.

    ``frames``: int64 (k,) 0-based, ascending, the annotated frames; ``boxes``: float32 (k, 4)
    normalised xyxy there; ``labels``: k tuples of class ids (contiguous once loaded; several =
    several actions at once). Between two annotated frames at most ``max_gap`` apart the track
    is present with a linearly interpolated box and the classes of the nearer annotated frame
    (the earlier on a tie); farther apart, it is absent in between."""

    track_id: int
    frames: np.ndarray
    boxes: np.ndarray
    labels: list[tuple[int, ...]]
    max_gap: int

    def segments(self) -> list[tuple[int, int]]:
        """Spans ``(first, last)`` (inclusive frames) where the track is present."""
        if not len(self.frames):
            return []
        breaks = np.flatnonzero(np.diff(self.frames) > self.max_gap)
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [len(self.frames) - 1]])
        return [(int(self.frames[a]), int(self.frames[b])) for a, b in zip(starts, ends)]

    def at(self, frames) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
        """The track at the given frames (T,): ``present`` bool (T,), ``boxes`` float32 (T, 4)
        normalised xyxy (zeros where absent), ``labels`` T tuples (``()`` where absent)."""
        q = np.asarray(frames, np.int64).reshape(-1)
        present, boxes = np.zeros(len(q), bool), np.zeros((len(q), 4), np.float32)
        labels: list[tuple[int, ...]] = [()] * len(q)
        k = len(self.frames)
        if not k or not len(q):
            return present, boxes, labels
        before = np.searchsorted(self.frames, q, side="right") - 1   # last annotated frame <= q
        after = np.minimum(before + 1, k - 1)
        f0, f1 = self.frames[np.maximum(before, 0)], self.frames[after]
        exact = (before >= 0) & (f0 == q)
        inside = (before >= 0) & (before + 1 < k) & (f1 - f0 <= self.max_gap) & ~exact
        w = np.where(inside, (q - f0) / np.maximum(f1 - f0, 1), 0.0).astype(np.float32)[:, None]
        b0, b1 = self.boxes[np.maximum(before, 0)], self.boxes[after]
        present = exact | inside
        boxes[present] = ((1 - w) * b0 + w * b1)[present]
        nearest = np.where(inside & (w[:, 0] > 0.5), after, before)
        labels = [self.labels[i] if p else () for i, p in zip(nearest.tolist(), present.tolist())]
        return present, boxes, labels

    def dense(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
        """Every frame where the track is present: ``frames`` int64 (n,), ``boxes`` float32 (n, 4)
        normalised xyxy (interpolated in gaps), ``labels`` n tuples (for per-frame metrics)."""
        spans = self.segments()
        frames = np.concatenate([np.arange(a, b + 1) for a, b in spans]) if spans else np.zeros(0, np.int64)
        _, boxes, labels = self.at(frames)
        return frames.astype(np.int64), boxes, labels


@dataclasses.dataclass
class VideoRecord:
    """One usable video. ``boxes``: float32 (N, 4) normalised xyxy; ``labels``: N contiguous ids.
    N = 0 for a video without action.

    ``tracks``: None for the seed's per-video labels (5 fields); for per-frame labels (7 fields)
    the list of :class:`Track` (empty for a video without action in a dataset that has per-frame
    labels). For per-frame records ``labels``/``boxes`` summarise the tracks: one entry per
    (track, class) with the box enclosing every annotated box of that track and class."""

    video: str
    path: str
    labels: list[int]
    boxes: np.ndarray
    width: int
    height: int
    num_frames: int
    fps: float
    tracks: list[Track] | None = None

    @property
    def has_action(self) -> bool:
        return len(self.labels) > 0

    @property
    def per_frame(self) -> bool:
        """True when the record's labels are per-frame tracks (windows and per-step targets)."""
        return self.tracks is not None


# ---------------------------------------------------------------------------- loading


def _resolve(root: pathlib.Path, rel: str) -> pathlib.Path:
    """Dataset-relative path; tolerates Windows separators written into the CSV."""
    path = root / rel
    if not path.exists() and "\\" in rel:
        path = root / rel.replace("\\", "/")
    return path


def _read_csv(csv_path: pathlib.Path) -> list[tuple[int, str, str]]:
    """Rows of the CSV as (CSV line number, video_file, label_file); header checked."""
    try:
        handle = csv_path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if "video_file" not in header:
            raise DatasetError(f"{csv_path}: header must be 'video_file,label_file', got {','.join(header)!r}")
        vcol = header.index("video_file")
        lcol = header.index("label_file") if "label_file" in header else None
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            get = lambda col: row[col].strip() if col is not None and col < len(row) else ""
            rows.append((reader.line_num, get(vcol), get(lcol)))
    return rows


def default_max_gap(fps: float) -> int:
    """One second of video in frames (29.97 fps -> 30): the default interpolation gap."""
    return max(1, int(math.ceil(fps - 1e-6)))


def _load_row(root, line, video_rel, label_rel, probe, problems, max_gap=None, fps=None):
    """Validate one CSV row. Returns ``(fields, boxes, tracks)`` or None if skipped: boxes
    ``[(raw id, normalised xyxy)]`` of a 5-field file, tracks (raw class ids) of a 7-field one
    (None otherwise)."""
    where = f"{CSV_NAME} line {line}"
    if not video_rel:
        problems.append(Problem(CSV_NAME, line, "empty video_file; row skipped", kind="empty video_file"))
        return None
    video_path = _resolve(root, video_rel)
    if not (video_path.is_file() or video_path.is_dir()):
        problems.append(Problem(video_rel, None, f"missing video ({where}); row skipped", kind="missing video"))
        return None
    try:
        info = video.probe_video(video_path, count_frames=probe, fps=fps)
    except video.VideoError as exc:
        reason = str(exc).replace(os.fspath(video_path) + ": ", "")
        problems.append(Problem(video_rel, None, f"unreadable or corrupt video: {reason} ({where}); row skipped",
                                kind="unreadable video"))
        return None
    if info.num_frames == 0:
        problems.append(Problem(video_rel, None, f"zero frames ({where}); row skipped", kind="zero frames"))
        return None
    fields, boxes, tracks = (video_rel, os.fspath(video_path.resolve()), info), [], None
    if label_rel:
        label_path = _resolve(root, label_rel)
        if not label_path.is_file():
            problems.append(Problem(label_rel, None, f"missing label file ({where}); row skipped",
                                    kind="missing label file"))
            return None
        instances, file_problems, data_lines = parse_label_file(label_path, label_rel)
        if any(isinstance(i, FrameInstance) for i in instances):
            gap = default_max_gap(info.fps) if max_gap is None else int(max_gap)
            tracks = _frame_tracks(instances, info, label_rel, gap, file_problems)
        else:
            boxes = _video_boxes(instances, info, label_rel, file_problems)
        problems.extend(_cap_problems(file_problems))
        if data_lines and not boxes and not tracks:  # a labelled video must not silently become a negative
            problems.append(Problem(label_rel, None, f"no usable instance ({where}); row skipped",
                                    kind="no usable instance"))
            return None
    return fields, boxes, tracks


def _video_boxes(instances, info, file, problems) -> list[tuple[int, np.ndarray]]:
    """5-field instances -> ``[(raw id, normalised xyxy)]``; empty boxes skipped, odd ones listed."""
    boxes = []
    for inst in instances:
        box = _checked_box(file, inst, info, problems, "instance")
        if box is not None:
            boxes.append((inst.raw_id, box))
    return boxes


def _checked_box(file, inst: Instance, info, problems: list, what: str) -> np.ndarray | None:
    """The line's box normalised to the frame, its odd parts listed as WARNING problems; None (and an
    empty-box problem: the ``what`` is skipped) when nothing is left after clipping."""
    box = normalise_box(inst.box, info.width, info.height)
    if box is None:
        problems.append(Problem(file, inst.line, f"empty box {list(inst.box)} after clipping to the "
                                                 f"{info.width}x{info.height} frame; {what} skipped", kind="empty"))
        return None
    problems.extend(Problem(file, inst.line, note, WARNING, "box")
                    for note in box_warnings(inst.box, info.width, info.height))
    return box


def _usable_frame_lines(instances, info, file, problems) -> list[tuple[FrameInstance, np.ndarray]]:
    """Per-frame instances with a frame inside the video and a non-empty box, with that box normalised."""
    out = []
    for inst in instances:
        if inst.frame >= info.num_frames:
            n = info.num_frames
            problems.append(Problem(file, inst.line, f"frame {inst.frame} is beyond the video's {n} frames "
                                                     f"(0-based: 0 to {n - 1}); line skipped", kind="beyond"))
            continue
        box = _checked_box(file, inst, info, problems, "line")
        if box is not None:
            out.append((inst, box))
    return out


def _group_frame_lines(usable, file, problems) -> dict[int, dict[int, dict]]:
    """``{track: {frame: {"box", "raw_ids", "lines"}}}``: lines of one frame, track and box merge
    (several actions); another box for the same frame and track, or a repeated line, is skipped."""
    tracks: dict[int, dict[int, dict]] = {}
    for inst, box in usable:
        entry = tracks.setdefault(inst.track, {}).get(inst.frame)
        if entry is None:
            tracks[inst.track][inst.frame] = {"box": box, "raw_ids": [inst.raw_id], "lines": [inst.line]}
        elif not np.allclose(entry["box"], box, atol=1e-6):
            first = entry["lines"][0]
            problems.append(Problem(file, inst.line, f"track {inst.track} already has another box at frame "
                                                     f"{inst.frame} (line {first}); line skipped", kind="conflict"))
        elif inst.raw_id in entry["raw_ids"]:
            first = entry["lines"][entry["raw_ids"].index(inst.raw_id)]
            problems.append(Problem(file, inst.line, f"repeats line {first}; line skipped", kind="duplicate"))
        else:
            entry["raw_ids"].append(inst.raw_id)
            entry["lines"].append(inst.line)
    return tracks


def _jump(prev, cur, gap: int, width: int, height: int) -> str | None:
    """Why the box moving from ``prev`` to ``cur`` (normalised xyxy, ``gap`` frames later) is a
    jump (see JUMP_FRAMES), or None."""
    scale = np.array([width, height, width, height], np.float32)
    a, b = prev * scale, cur * scale
    move = float(np.hypot(*((b[:2] + b[2:]) / 2 - (a[:2] + a[2:]) / 2)))
    diagonal = (float(np.hypot(*(a[2:] - a[:2]))) + float(np.hypot(*(b[2:] - b[:2])))) / 2
    limit = max(1.0, gap / JUMP_FRAMES) * diagonal
    if move <= limit:
        return None
    return f"its box centre moves {move:.0f} px in {gap} frame(s), more than {limit:.0f} px"


def _frame_tracks(instances, info, file, max_gap: int, problems) -> list[Track]:
    """Per-frame instances -> tracks (raw class ids), every bad line a Problem (see JUMP_FRAMES)."""
    grouped = _group_frame_lines(_usable_frame_lines(instances, info, file, problems), file, problems)
    tracks = []
    for track_id in sorted(grouped):
        kept: list[tuple[int, dict]] = []
        for frame in sorted(grouped[track_id]):
            entry = grouped[track_id][frame]
            gap = frame - kept[-1][0] if kept else max_gap + 1
            why = _jump(kept[-1][1]["box"], entry["box"], gap, info.width, info.height) if gap <= max_gap else None
            if why:  # compared with the last kept frame: one wrong line is skipped, the track goes on
                since = f"from frame {kept[-1][0]} (line {kept[-1][1]['lines'][0]})"
                problems.extend(Problem(file, line, f"track {track_id} jumps at frame {frame} {since}: {why}; "
                                                    "line skipped", kind="jump") for line in entry["lines"])
                continue
            kept.append((frame, entry))
        if kept:
            tracks.append(Track(track_id, np.array([f for f, _ in kept], np.int64),
                                np.stack([e["box"] for _, e in kept]).astype(np.float32),
                                [tuple(sorted(set(e["raw_ids"]))) for _, e in kept], max_gap))
    return tracks


def _cap_problems(problems: list[Problem], limit: int = MAX_PROBLEMS_PER_KIND) -> list[Problem]:
    """The first ``limit`` problems of each (file, kind, severity), in line order, then one line
    counting the rest."""
    problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
    out, counts, extra = [], {}, {}
    for problem in problems:
        key = (problem.file, problem.kind, problem.severity)
        counts[key] = counts.get(key, 0) + 1
        if problem.kind and counts[key] > limit:
            extra.setdefault(key, []).append(problem.line)
        else:
            out.append(problem)
    for (file, kind, severity), lines in extra.items():
        done = "skipped" if severity == SKIPPED else "used"
        out.append(Problem(file, None, f"{len(lines)} more line(s) like the above ({kind}, lines {lines[0]} to "
                                       f"{lines[-1]}); {done}", severity, kind))
    return out


def load_dataset(root, class_names=None, probe: bool = True, max_gap: int | None = None, fps: float | None = None):
    """Read and validate a whole dataset folder. Returns ``(records, class_map, problems)``.

    Every video is opened (size, frame count, first frame decoded) and every label parsed;
    each problem names the file and line, and bad rows are skipped. ``probe=True`` counts
    frames exactly (demuxes each file); ``probe=False`` trusts container counts (faster on
    big datasets; decoding still copes with a wrong count). A label file with no data lines
    is a video without action. Raises DatasetError when the CSV is missing or nothing usable
    remains (``err.problems`` holds the table).

    Per-frame label files become :class:`Track` lists (``record.tracks``): ``max_gap`` is the
    largest gap in frames interpolated between two annotated frames of a track (None: one second
    of each video, :func:`default_max_gap`). ``fps``: the rate of videos given as frame folders
    (None: ``video.DEFAULT_FOLDER_FPS``). When any label file is per-frame, videos without action
    get ``tracks = []`` (windowed like the others, see :class:`ActionDataset`).
    """
    root = pathlib.Path(root)
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        raise DatasetError(f"no {CSV_NAME} in {root} (expected header video_file,label_file)")
    if max_gap is not None and int(max_gap) < 0:
        raise ValueError(f"max_gap must be >= 0 frames, got {max_gap}")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    loaded = []
    for line, video_rel, label_rel in _read_csv(csv_path):
        key = os.path.normpath(video_rel.replace("\\", "/")) if video_rel else ""
        if key and key in seen:
            problems.append(Problem(CSV_NAME, line, f"duplicate row for {video_rel!r} (first at line "
                                                    f"{seen[key]}); row skipped", kind="duplicate row"))
            continue
        seen[key] = line
        row = _load_row(root, line, video_rel, label_rel, probe, problems, max_gap, fps)
        if row is not None:
            loaded.append(row)
    if not loaded:
        raise DatasetError(f"no usable videos in {csv_path} ({len(problems)} problem(s))", problems)
    raw_ids = [raw for _, boxes, _ in loaded for raw, _ in boxes]
    raw_ids += [raw for _, _, tracks in loaded for t in tracks or () for ids in t.labels for raw in ids]
    class_map, class_problems = build_class_map(raw_ids, class_names, root / CLASSES_NAME)
    problems.extend(class_problems)
    per_frame = any(tracks is not None for _, _, tracks in loaded)
    records = [_make_record(fields, boxes, class_map, tracks if tracks is not None or boxes or not per_frame else [])
               for fields, boxes, tracks in loaded]
    return records, class_map, problems


def _make_record(fields, boxes, class_map: ClassMap, tracks=None) -> VideoRecord:
    (video_rel, path, info) = fields
    if tracks is not None:
        tracks = [dataclasses.replace(t, labels=[tuple(sorted(class_map.index(r) for r in ids)) for ids in t.labels])
                  for t in tracks]
        boxes = _track_summary(tracks)
        labels = [c for c, _ in boxes]
    else:
        labels = [class_map.index(raw) for raw, _ in boxes]
    arr = np.stack([b for _, b in boxes]).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return VideoRecord(video_rel, path, labels, arr, info.width, info.height, info.num_frames, info.fps, tracks)


def _track_summary(tracks: list[Track]) -> list[tuple[int, np.ndarray]]:
    """One (class, box enclosing the track's annotated boxes of that class) per track and class."""
    out = []
    for track in tracks:
        for c in sorted({c for ids in track.labels for c in ids}):
            rows = track.boxes[[c in ids for ids in track.labels]]
            out.append((c, np.concatenate([rows[:, :2].min(0), rows[:, 2:].max(0)]).astype(np.float32)))
    return out


# ---------------------------------------------------------------------------- split


def _stratum(record: VideoRecord) -> int:
    """Class used to stratify: the first instance's class, -1 for videos without action."""
    return record.labels[0] if record.labels else -1


def _choose_val(records, val_fraction, rng) -> tuple[set[str], str]:
    """Validation video names: per class when every class has >= 2 videos, else at random."""
    groups: dict[int, list[str]] = {}
    for r in records:
        groups.setdefault(_stratum(r), []).append(r.video)
    small = sorted(k for k, v in groups.items() if len(v) < 2)
    if small or len(records) < 2:
        names = [r.video for r in records]
        n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction))) if len(names) > 1 else 0
        picked = rng.permutation(len(names))[:n_val]
        which = ", ".join("no action" if k == -1 else f"class {k}" for k in small)
        return {names[i] for i in picked}, f"random split ({which or 'the dataset'} has fewer than 2 videos, too small to stratify)"
    val = set()
    for key in sorted(groups):
        names = sorted(groups[key])
        n_val = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
        val.update(names[i] for i in rng.permutation(len(names))[:n_val])
    return val, "stratified split by class"


def split_dataset(records, val_fraction: float = 0.2, seed: int = 42, split_path=None):
    """Split records into ``(train, val, note)``; ``note`` says how (one line).

    Stratified by class (negatives are a class), at least one validation video per class;
    a plain random split when some class is too small, said in the note. With
    ``split_path`` (split.json) an existing split for the same videos, fraction and seed is
    reused (resume); otherwise a new one is written there.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(r.video for r in records)
    saved = _read_split(split_path) if split_path else None
    if saved and sorted(saved["train"] + saved["val"]) == names and saved.get("seed") == seed \
            and saved.get("val_fraction") == val_fraction:
        val_names, note = set(saved["val"]), f"reused {split_path}"
    else:
        if val_fraction == 0:
            val_names, note = set(), "no validation split (val_fraction 0)"
        else:
            val_names, note = _choose_val(records, val_fraction, np.random.default_rng(seed))
        if saved:
            note += f"; {split_path} was for other videos or settings, replaced"
        if split_path:
            _write_split(split_path, names, val_names, seed, val_fraction, note)
    train = [r for r in records if r.video not in val_names]
    val = [r for r in records if r.video in val_names]
    return train, val, f"{note}: {len(train)} train / {len(val)} validation videos"


def _read_split(path) -> dict | None:
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("train"), list) and isinstance(data.get("val"), list)
    return data if ok else None


def _write_split(path, names, val_names, seed, val_fraction, note) -> None:
    """Atomic write: a crash never leaves a half-written split.json for the resume to read."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"seed": seed, "val_fraction": val_fraction, "note": note,
            "train": [n for n in names if n not in val_names], "val": sorted(val_names)}
    files.write_text(path, json.dumps(data, indent=1) + "\n")
