"""Training data: CSV and label parsing, class-id mapping, validation, split, the clip
dataset with augmentation, and the balanced batch sampler.

Layout (paths in the CSV are relative to the dataset folder)::

    action_challenge.csv   header video_file,label_file; empty label_file = no action
    <video>                any container PyAV reads (.mp4 .avi .mov .mkv ...), or a folder of
                           numbered frames (00001.jpg ...) at ``fps`` (see video.py)
    <label>.txt            one instance a line: <class_id> <x1> <y1> <x2> <y2> (pixels, xyxy)
                           or per-frame lines: <frame> <track_id> <class_id> <x1> <y1> <x2> <y2>
    classes.txt            optional, one name a line for the sorted raw class ids

A label file holds one kind of line. 5 fields: "this box, this action, the whole video".
7 fields (DESIGN.md "Tubes"): ``frame`` is the 0-based decoded frame, ``track_id`` one actor;
a track exists at the frames where it has lines, and between two of its lines at most
``max_gap`` frames apart (default: one second of the video) its box is interpolated linearly,
so sparse keyframe labels (AVA: one a second) train too. Several lines with the same frame,
track and box but different class ids are several actions at once.

Box formats: label files hold pixel xyxy; :class:`VideoRecord` and :class:`Track` hold
normalised xyxy (divided by the video's real frame size, clipped to [0, 1]); targets returned
by :class:`ActionDataset` hold normalised cxcywh, as the model and losses expect.
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

import files
import video

CSV_NAME = "action_challenge.csv"
CLASSES_NAME = "classes.txt"
LABEL_FORMAT = "<class_id> <x1> <y1> <x2> <y2>"
FRAME_LABEL_FORMAT = "<frame> <track_id> <class_id> <x1> <y1> <x2> <y2>"

# Problem severities: SKIPPED = the row, line or instance is not used; WARNING = used, as corrected.
SKIPPED, WARNING = "skipped", "warning"
# A box with less than this fraction of its area inside the frame is listed (clipped, used): a
# wrong resolution or an x y w h box. Boxes a little outside are normal (actors at the border).
OUTSIDE_WARN_KEEP = 0.5
# A track jumps when its box centre moves more than max(1, gap / JUMP_FRAMES) box diagonals
# between two consecutive annotated frames `gap` frames apart (a person moves far less than one
# body diagonal a frame; a swapped track id or a typo moves any distance).
JUMP_FRAMES = 4
# At most this many problems of one kind per file are listed; the rest are counted in one line
# (a per-frame file of a wrong frame rate would otherwise list thousands of lines).
MAX_PROBLEMS_PER_KIND = 10
# Ids (class, track, frame) are stored as int64 tensors: a larger one is a malformed line, not a crash in training.
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
IDS_64_BITS = "ids must fit in 64 bits"

log = logging.getLogger(__name__)


class DatasetError(Exception):
    """The dataset cannot be used (no CSV, nothing usable left...); one-line message.

    ``problems`` holds the per-file problems found on the way, for :func:`format_problems`."""

    def __init__(self, message: str, problems: Sequence["Problem"] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: the file (relative to the dataset root), the line in
    that file when it applies, and what is wrong (including what was done about it).

    ``severity``: SKIPPED (the row, line or instance is not used) or WARNING (used as corrected).
    ``kind`` groups problems of one sort: for the per-file cap, and for :func:`format_problems`' summary."""

    file: str
    line: int | None
    message: str
    severity: str = SKIPPED
    kind: str = dataclasses.field(default="", compare=False)


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


class ClassMap:
    """Raw class ids (as written in label files) <-> contiguous indices 0..C-1, plus names.

    ``raw_ids[i]`` and ``names[i]`` describe contiguous class ``i``."""

    def __init__(self, raw_ids: Sequence[int], names: Sequence[str]):
        if len(raw_ids) != len(names):
            raise ValueError(f"{len(raw_ids)} class ids but {len(names)} names")
        if len(set(raw_ids)) != len(raw_ids):
            raise ValueError(f"duplicate raw class ids in {list(raw_ids)}")
        self.raw_ids = [int(r) for r in raw_ids]
        self.names = [str(n) for n in names]
        self._index = {r: i for i, r in enumerate(self.raw_ids)}

    def index(self, raw_id: int) -> int:
        """Contiguous index of a raw id (KeyError if unknown)."""
        return self._index[int(raw_id)]

    def __len__(self) -> int:
        return len(self.raw_ids)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{r}->{i}:{n}" for i, (r, n) in enumerate(zip(self.raw_ids, self.names)))
        return f"ClassMap({pairs})"


# ---------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Instance:
    """One parsed label line: raw class id and a pixel xyxy box."""

    raw_id: int
    box: tuple[float, float, float, float]
    line: int


@dataclasses.dataclass(frozen=True)
class FrameInstance(Instance):
    """One parsed per-frame line: also its 0-based frame and its track id."""

    frame: int
    track: int


def _parse_int(token: str) -> int:
    """Class ids written as '2' or '2.0' (some tools write floats); anything else fails, and so does an id that
    does not fit in 64 bits (the training targets hold int64)."""
    value = float(token)
    if not value.is_integer():
        raise ValueError(token)
    value = int(token) if token.lstrip("+-").isdigit() else int(value)   # exact: float() rounds 2**63 - 1 up
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(IDS_64_BITS)
    return value


def _parse_box(tokens) -> tuple[float, float, float, float]:
    box = tuple(float(t) for t in tokens)
    if not all(math.isfinite(v) for v in box):
        raise ValueError("not finite")
    return box


def _parse_tokens(tokens: list[str], number: int) -> Instance:
    """A 5- or 7-field line's tokens -> Instance or FrameInstance; ValueError(reason) if malformed."""
    if len(tokens) == 5:
        return Instance(_parse_int(tokens[0]), _parse_box(tokens[1:]), number)
    if len(tokens) != 7:
        raise ValueError("field count")
    frame, track = _parse_int(tokens[0]), _parse_int(tokens[1])
    if frame < 0:
        raise ValueError("frame must be >= 0")
    return FrameInstance(_parse_int(tokens[2]), _parse_box(tokens[3:]), number, frame, track)


def _file_kind(parsed: list[Instance]) -> int:
    """5 or 7: the kind of most well-formed lines (the first line's kind on a tie)."""
    sevens = sum(isinstance(i, FrameInstance) for i in parsed)
    fives = len(parsed) - sevens
    if sevens != fives:
        return 7 if sevens > fives else 5
    return 7 if parsed and isinstance(parsed[0], FrameInstance) else 5


def parse_label_lines(lines: Sequence[str], file: str) -> tuple[list[Instance], list[Problem], int]:
    """Parse label text lines. Returns (instances, problems, number of data lines).

    A file holds 5-field lines (:class:`Instance`) or 7-field per-frame lines
    (:class:`FrameInstance`); its kind is that of most of its well-formed lines, and lines of
    the other kind are problems. Blank lines and ``#`` comments (whole-line or trailing) are
    ignored; commas count as separators. A malformed line becomes a Problem and is skipped."""
    parsed, bad, data_lines = [], [], 0
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        data_lines += 1
        try:
            parsed.append(_parse_tokens(text.split(), number))
        except ValueError as exc:
            bad.append((number, raw.strip(), str(exc)))
    kind = _file_kind(parsed)
    instances = [i for i in parsed if isinstance(i, FrameInstance) == (kind == 7)]
    problems = [_malformed(file, number, raw, reason, kind, bool(parsed)) for number, raw, reason in bad]
    for inst in parsed:
        if isinstance(inst, FrameInstance) != (kind == 7):
            problems.append(Problem(file, inst.line, f"mixes 5- and 7-field lines: this file holds {kind}-field lines "
                                                     f"('{_format(kind)}'); line skipped", kind="mixed"))
    problems.sort(key=lambda p: p.line)
    return instances, problems, data_lines


def _format(kind: int) -> str:
    return FRAME_LABEL_FORMAT if kind == 7 else LABEL_FORMAT


def _malformed(file, number, raw, reason, kind, known) -> Problem:
    """The problem for a malformed line; names the format the rest of the file uses."""
    expected = f"'{_format(kind)}'" if known else f"'{LABEL_FORMAT}' or '{FRAME_LABEL_FORMAT}'"
    note = f", {reason}" if reason in ("frame must be >= 0", IDS_64_BITS) else ""
    return Problem(file, number, f"malformed label line {raw!r} (expected {expected}{note}); line skipped",
                   kind="malformed")


def parse_label_file(path, file: str | None = None) -> tuple[list[Instance], list[Problem], int]:
    """Read and parse one label file (see :func:`parse_label_lines`); unreadable -> Problem."""
    file = file or os.fspath(path)
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        return [], [Problem(file, None, f"unreadable label file ({exc.strerror or exc})", kind="unreadable label file")], 0
    return parse_label_lines(text.splitlines(), file)


def normalise_box(box, width: int, height: int) -> np.ndarray | None:
    """Pixel xyxy -> normalised xyxy clipped to the frame; None when empty after clipping.

    Also accepts swapped corners (x2 < x1): some tools write them, the region is the same."""
    x1, y1, x2, y2 = box
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    out = np.array([x1 / width, y1 / height, x2 / width, y2 / height], np.float32).clip(0.0, 1.0)
    if out[2] <= out[0] or out[3] <= out[1]:
        return None
    return out


def box_warnings(box, width: int, height: int) -> list[str]:
    """Why a usable pixel xyxy ``box`` looks wrong (one-line reasons, empty when it looks right):
    swapped corners (x2 < x1 or y2 < y1: often a box written as x y w h), or less than
    OUTSIDE_WARN_KEEP of its area inside the ``width`` x ``height`` frame."""
    x1, y1, x2, y2 = box
    notes = []
    if x2 < x1 or y2 < y1:
        notes.append(f"box {list(box)} has swapped corners (x2 < x1 or y2 < y1: written as x y w h?); "
                     "used with its corners sorted")
    (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))
    inside = max(0.0, min(x2, width) - max(x1, 0)) * max(0.0, min(y2, height) - max(y1, 0))
    kept = inside / max((x2 - x1) * (y2 - y1), 1e-9)
    if kept < OUTSIDE_WARN_KEEP:
        notes.append(f"box {list(box)} lies {100 * (1 - kept):.0f}% outside the {width}x{height} frame "
                     "(labels for another resolution, or x y w h?); used clipped")
    return notes


def read_class_names(path) -> list[str] | None:
    """Names from classes.txt (one a line, blank lines and # comments skipped); None if absent."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def build_class_map(raw_ids, class_names=None, classes_file=None) -> tuple[ClassMap, list[Problem]]:
    """Sorted unique raw ids -> contiguous indices; names from ``class_names`` (list, or a
    comma-separated string), else ``classes_file``, else ``action_<raw id>``.

    Wrong number of ``class_names`` -> DatasetError (the user asked for them); a
    classes.txt that does not fit is reported and default names are used."""
    ids = sorted({int(r) for r in raw_ids})
    default = [f"action_{r}" for r in ids]
    if isinstance(class_names, str):
        class_names = [n.strip() for n in class_names.split(",") if n.strip()]
    if class_names:
        if len(class_names) != len(ids):
            raise DatasetError(f"--class_names gives {len(class_names)} names "
                               f"({', '.join(class_names)}) but the labels use {len(ids)} class ids {ids}")
        return ClassMap(ids, class_names), []
    names = read_class_names(classes_file) if classes_file else None
    if names is None:
        return ClassMap(ids, default), []
    if len(names) != len(ids):
        rel = pathlib.Path(classes_file).name
        return ClassMap(ids, default), [Problem(rel, None, f"{len(names)} names for {len(ids)} class ids "
                                                         f"{ids}; using names action_<id>", WARNING, "class names")]
    return ClassMap(ids, names), []


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


def format_problems(problems: Sequence[Problem], per_kind: int | None = None) -> str:
    """One table of problems (file, line, severity, problem); 'no problems found' when empty.

    Severity ``skipped``: the row, line or instance is not used; ``warning``: used as corrected. ``per_kind``: list
    only the first that many problems of each kind, the rest of each kind counted in one line (100,000 rows naming
    missing videos make a 100,000-line table otherwise); the first line still counts them all."""
    if not problems:
        return "no problems found in the dataset"
    shown = list(problems) if per_kind is None else _first_of_each_kind(problems, per_kind)
    rows = [(p.file, "-" if p.line is None else str(p.line), p.severity, p.message) for p in shown]
    warnings = sum(p.severity == WARNING for p in problems)
    wf = max(4, *(len(r[0]) for r in rows))
    wl = max(4, *(len(r[1]) for r in rows))
    ws = max(8, *(len(r[2]) for r in rows))
    cut = f"; the first {per_kind} of each kind" if len(shown) < len(problems) else ""
    lines = [f"{len(problems)} problem(s) in the dataset ({len(problems) - warnings} skipped, {warnings} warning(s): "
             f"used as corrected){cut}:",
             f"{'file':<{wf}}  {'line':>{wl}}  {'severity':<{ws}}  problem",
             f"{'-' * wf}  {'-' * wl}  {'-' * ws}  {'-' * 7}"]
    lines += [f"{f:<{wf}}  {ln:>{wl}}  {sv:<{ws}}  {m}" for f, ln, sv, m in rows]
    return "\n".join(lines)


def _first_of_each_kind(problems: Sequence[Problem], limit: int) -> list[Problem]:
    """The first ``limit`` problems of each (kind, severity), kinds in order of first appearance, each followed by
    one problem counting the rest of its kind."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.kind, problem.severity), []).append(problem)
    out = []
    for (kind, severity), group in groups.items():
        out += group[:limit]
        if len(group) > limit:
            out.append(Problem("...", None, f"{len(group) - limit} more like the above ({kind or 'other'})", severity,
                               kind))
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


# ---------------------------------------------------------------------------- augmentation

# Augmentation strengths (immutable module constants, not configuration).
MAX_TEMPORAL_SHIFT = 0.5      # fraction of the sampling step the whole grid may move
CROP_SCALE = (0.75, 1.0)      # crop side as a fraction of the frame side
MIN_BOX_KEEP = 0.6            # a crop must keep this fraction of every box's area
COLOUR_JITTER = 0.2           # brightness / contrast / saturation factors in 1 +- this
CHANNEL_SWAP_PROB = 0.5       # random RGB order: colour must not identify a training video
STILL_NOISE = 2.0             # grey levels of per-frame noise on still clips (cameras flicker)
MAX_STRIP = 0.8               # side by side: a clip's strip (all its boxes) is at most this share of its width


def jittered_indices(num_frames: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """The uniform grid shifted as a whole by up to half a sampling step, clipped: (T,) int."""
    step = (num_frames - 1) / max(T - 1, 1)
    shift = rng.uniform(-MAX_TEMPORAL_SHIFT, MAX_TEMPORAL_SHIFT) * step
    grid = np.linspace(0, num_frames - 1, T) + shift
    return np.clip(np.round(grid), 0, num_frames - 1).astype(int)


def hflip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Mirror normalised xyxy boxes: x1' = 1 - x2, x2' = 1 - x1."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return out


def crop_boxes(boxes: np.ndarray, crop) -> np.ndarray:
    """Express normalised xyxy boxes in a normalised crop ``(cx1, cy1, cx2, cy2)``, clipped."""
    cx1, cy1, cx2, cy2 = crop
    scale = np.array([cx2 - cx1, cy2 - cy1, cx2 - cx1, cy2 - cy1], np.float32)
    return ((boxes - np.array([cx1, cy1, cx1, cy1], np.float32)) / scale).clip(0.0, 1.0)


def _kept_fraction(boxes: np.ndarray, crop) -> np.ndarray:
    """Fraction of each box's area inside the crop."""
    ix = np.clip(np.minimum(boxes[:, 2], crop[2]) - np.maximum(boxes[:, 0], crop[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], crop[3]) - np.maximum(boxes[:, 1], crop[1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return ix * iy / np.maximum(area, 1e-9)


def random_crop(boxes: np.ndarray, rng: np.random.Generator, tries: int = 10):
    """A normalised crop keeping >= MIN_BOX_KEEP of every box; the full frame if none found."""
    for _ in range(tries):
        sw, sh = rng.uniform(*CROP_SCALE, size=2)
        x0, y0 = rng.uniform(0, 1 - sw), rng.uniform(0, 1 - sh)
        crop = (x0, y0, x0 + sw, y0 + sh)
        if not len(boxes) or (_kept_fraction(boxes, crop) >= MIN_BOX_KEEP).all():
            return crop
    return (0.0, 0.0, 1.0, 1.0)


def colour_jitter(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Same brightness, contrast and saturation change on every frame: (T, H, W, 3) uint8."""
    return _colour(frames, 1 + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3))


def _colour(frames: np.ndarray, factors) -> np.ndarray:
    """:func:`colour_jitter` with its (brightness, contrast, saturation) factors given."""
    b, c, s = factors
    x = frames.astype(np.float32) * b
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * s                 # saturation: away from / towards grey
    x = x.mean() + (x - x.mean()) * c         # contrast: around the clip's mean
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ClipAugmentation:
    """One clip's augmentation, drawn once (:func:`draw_augmentation`) and applied alike to its
    frames and to every box of the clip (all actors, all steps).

    ``crop``: pixel (x1, y1, x2, y2) cut from each frame of size ``frame_size`` (h, w), resized to
    ``img_size``; ``flip``: horizontal; ``channels``: RGB order or None; ``colour``: factors."""

    crop: tuple[int, int, int, int]
    frame_size: tuple[int, int]
    img_size: int
    flip: bool
    channels: tuple[int, int, int] | None
    colour: tuple[float, float, float]

    def apply_frames(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, S, S, 3) uint8."""
        x1, y1, x2, y2 = self.crop
        out = np.stack([cv2.resize(np.ascontiguousarray(f[y1:y2, x1:x2]), (self.img_size, self.img_size),
                                   interpolation=cv2.INTER_LINEAR) for f in frames])
        if self.flip:
            out = out[:, :, ::-1]
        if self.channels is not None:
            out = out[..., list(self.channels)]
        return _colour(out, self.colour)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Normalised xyxy boxes (K, 4) of the frame -> of the augmented clip (K, 4), clipped."""
        h, w = self.frame_size
        x1, y1, x2, y2 = self.crop
        out = crop_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), (x1 / w, y1 / h, x2 / w, y2 / h))
        return hflip_boxes(out) if self.flip else out


def draw_augmentation(boxes: np.ndarray, frame_size, rng: np.random.Generator, img_size: int) -> ClipAugmentation:
    """Draw crop/scale (keeping MIN_BOX_KEEP of every box in ``boxes`` (K, 4) normalised xyxy),
    flip (p = 0.5), channel order and colour factors, in that order from ``rng``."""
    h, w = frame_size
    crop = random_crop(boxes, rng)
    x1, y1 = int(round(crop[0] * w)), int(round(crop[1] * h))
    x2, y2 = max(x1 + 1, int(round(crop[2] * w))), max(y1 + 1, int(round(crop[3] * h)))
    flip = bool(rng.random() < 0.5)
    channels = tuple(int(c) for c in rng.permutation(3)) if rng.random() < CHANNEL_SWAP_PROB else None
    colour = tuple(1 + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3))  # numpy float64, as colour_jitter
    return ClipAugmentation((x1, y1, x2, y2), (h, w), int(img_size), flip, channels, colour)


def augment_clip(frames: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, img_size: int):
    """Crop/scale jitter, horizontal flip (p = 0.5) and colour jitter, box-consistent.

    frames (T, H, W, 3) uint8 -> (T, S, S, 3) uint8; boxes (N, 4) normalised xyxy -> same,
    transformed and clipped (never dropped: the crop keeps most of every box)."""
    aug = draw_augmentation(boxes, frames.shape[1:3], rng, img_size)
    return aug.apply_frames(frames), aug.apply_boxes(boxes)


def still_clip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame of the clip repeated T times, each copy with its own faint noise: (T, H, W, 3) uint8.

    A still clip of a video with an action is a video without one (same look, no motion): it
    teaches that the action is in the motion, which appearance alone cannot explain."""
    frame = frames[rng.integers(len(frames))].astype(np.float32)
    noise = rng.normal(0.0, STILL_NOISE, size=frames.shape).astype(np.float32)
    return np.clip(np.rint(frame[None] + noise), 0, 255).astype(np.uint8)


def _strip(acting: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    """A random horizontal span ``(x1, x2)`` (normalised) holding every acting box, half the width or more (at
    most MAX_STRIP); None when the boxes span more."""
    if not acting.any():
        x1 = rng.uniform(0.0, 0.5)
        return x1, x1 + 0.5
    lo, hi = float(boxes[acting][:, 0].min()), float(boxes[acting][:, 2].max())
    width = max(0.5, hi - lo)
    if width > MAX_STRIP:
        return None
    x1 = rng.uniform(max(0.0, hi - width), min(lo, 1.0 - width))
    return x1, x1 + width


def side_by_side(a: tuple, b: tuple, rng: np.random.Generator) -> tuple | None:
    """Two augmented clips as one, each in a half of the frame: a scene with both clips' actors.

    ``a``, ``b``: ``(frames (T, S, S, 3) uint8, acting (M, T) bool, boxes (M, T, 4) normalised xyxy)``. Each clip
    gives a strip of its frames that holds all its acting boxes (:func:`_strip`), resized to half the width; ``a``
    goes left or right at random. Returns the joined ``(frames, acting, boxes)`` (``a``'s rows first), or None when
    a clip's boxes span more than MAX_STRIP of its width. Why: the field's scenes often hold several actors, while
    most training windows hold one; the decoder must learn to give each its own query and box."""
    strips = [_strip(a[1], a[2], rng), _strip(b[1], b[2], rng)]
    if None in strips:
        return None
    size = a[0].shape[2]
    left = size // 2
    a_left = bool(rng.random() < 0.5)
    parts, all_boxes = [], []
    for (frames, acting, boxes), (x1, x2), at_left in zip((a, b), strips, (a_left, not a_left)):
        width, offset = (left, 0) if at_left else (size - left, left)
        p1, p2 = int(round(x1 * size)), max(int(round(x1 * size)) + 1, int(round(x2 * size)))
        parts.append((offset, np.stack([cv2.resize(np.ascontiguousarray(f[:, p1:p2]), (width, f.shape[0]),
                                                   interpolation=cv2.INTER_LINEAR) for f in frames])))
        moved = boxes.copy()
        scale = width / (p2 - p1)
        for k in (0, 2):
            moved[..., k] = ((boxes[..., k] * size - p1) * scale + offset).clip(offset, offset + width) / size
        all_boxes.append(np.where(acting[..., None], moved, 0.0).astype(np.float32))
    frames = np.concatenate([f for _, f in sorted(parts, key=lambda p: p[0])], axis=2)
    return frames, np.concatenate([a[1], b[1]]), np.concatenate(all_boxes)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) cxcywh (same units)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] + wh / 2, wh], axis=1)


# ---------------------------------------------------------------------------- windows and tubes

NEGATIVE_PROB = 0.2   # default share of training windows placed away from every track


def window_length(record: VideoRecord, window_frames: int | None = None, window_sec: float | None = None,
                  num_frames: int | None = None) -> int:
    """Frames one clip of ``record`` spans: ``window_frames``, else ``window_sec`` at the video's rate
    (cut as :func:`video.window_spans` cuts test.py's windows), else the whole video; at most the
    video (``num_frames``: its length when known better than the record's)."""
    n = int(num_frames or record.num_frames)
    if window_frames is not None:
        win = int(window_frames)
    elif window_sec is not None:
        win = video.seconds_to_frames(window_sec, record.fps)
    else:
        win = n
    if win < 1:
        raise ValueError(f"a window must span at least one frame, got {win}")
    return min(win, n)


def track_spans(record: VideoRecord, num_frames: int | None = None) -> list[tuple[int, int]]:
    """Sorted, merged inclusive frame spans ``(first, last)`` where any track of ``record`` is
    present (inside the first ``num_frames`` frames); [] for a record without tracks."""
    n = int(num_frames or record.num_frames)
    merged: list[list[int]] = []
    for a, b in sorted(span for t in record.tracks or () for span in t.segments()):
        if a >= n:
            continue
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], min(b, n - 1))
        else:
            merged.append([a, min(b, n - 1)])
    return [(a, b) for a, b in merged]


def _free_starts(spans, n: int, win: int) -> list[tuple[int, int]]:
    """Inclusive ranges of window starts whose ``win`` frames hold no frame of ``spans``."""
    free, lo = [], 0
    for a, b in spans:
        hi = min(a - win, n - win)
        if hi >= lo:
            free.append((lo, hi))
        lo = max(lo, b + 1)
    if lo <= n - win:
        free.append((lo, n - win))
    return free


def _uniform_in(ranges, rng: np.random.Generator) -> int:
    """A value drawn uniformly from the union of inclusive integer ``ranges``."""
    sizes = np.array([b - a + 1 for a, b in ranges])
    k = int(rng.integers(sizes.sum()))
    which = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
    return int(ranges[which][0] + k - (sizes[:which].sum() if which else 0))


def training_window(record: VideoRecord, win: int, rng: np.random.Generator, negative_prob: float = NEGATIVE_PROB,
                    num_frames: int | None = None) -> tuple[int, int]:
    """A random window ``[start, end)`` of ``win`` frames for training.

    With probability ``negative_prob`` (when the video has such places) it holds no track frame:
    uniform over those starts; otherwise it holds a frame drawn uniformly from the frames where a
    track is present, at a uniform place in the window. A video without tracks: uniform."""
    n = int(num_frames or record.num_frames)
    win = min(win, n)
    if win >= n:
        return 0, n
    spans = track_spans(record, n)
    free = _free_starts(spans, n, win)
    if spans and not (free and rng.random() < negative_prob):
        frame = _uniform_in(spans, rng)
        start = int(np.clip(frame - rng.integers(0, win), 0, n - win))  # the window holds `frame`
    else:
        start = _uniform_in(free or [(0, n - win)], rng)
    return start, start + win


def validation_window(record: VideoRecord, win: int, num_frames: int | None = None) -> tuple[int, int]:
    """The deterministic window ``[start, end)``: centred on the middle of the tracks' extent
    (first to last frame where any track is present), or of the video without tracks."""
    n = int(num_frames or record.num_frames)
    win = min(win, n)
    spans = track_spans(record, n)
    first, last = (spans[0][0], spans[-1][1]) if spans else (0, n - 1)
    start = int(np.clip(math.floor((first + last + 1 - win) / 2 + 0.5), 0, n - win))
    return start, start + win


def video_windows(record: VideoRecord, T: int, window_frames: int, stride_frames: int | None = None
                  ) -> list[tuple[int, int, np.ndarray]]:
    """Every window of a video, as inference cuts them: ``(start, end, indices (T,) int64)``.

    Spans are :func:`video.window_spans_frames` (``stride_frames`` default: the window, so
    windows tile the video and the last one ends at its last frame); the T frames of a window
    are ``start + video.sample_indices(end - start, T)``, the frames :func:`video.iter_windows`
    decodes. With ``window_frames = video.seconds_to_frames(window_sec, fps)`` (and the stride
    alike) these are test.py's windows."""
    win = window_length(record, window_frames)
    stride = int(stride_frames or win)
    spans = video.window_spans_frames(record.num_frames, win, stride)
    return [(s, e, (s + video.sample_indices(e - s, T)).astype(np.int64)) for s, e in spans]


def clip_tubes(record: VideoRecord, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ground truth at a clip's frames ``indices`` (T,): one row per (track, class) acting in at
    least one of them (a track doing two actions has two rows).

    Returns ``track_ids`` int64 (M,), ``classes`` int64 (M,), ``acting`` bool (M, T) and
    ``boxes`` float32 (M, T, 4) normalised xyxy (zeros where not acting). A 5-field record: one
    row per instance (track id = its index), acting at every step with its box."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    T = len(idx)
    if record.tracks is None:
        n = len(record.labels)
        return (np.arange(n, dtype=np.int64), np.asarray(record.labels, np.int64).reshape(-1),
                np.ones((n, T), bool), np.repeat(record.boxes[:, None].astype(np.float32), T, axis=1))
    rows = []
    for track in record.tracks:
        present, boxes, labels = track.at(idx)
        for c in sorted({c for ids in labels for c in ids}):
            acting = np.array([c in ids for ids in labels], bool)
            rows.append((track.track_id, c, acting, np.where(acting[:, None], boxes, 0.0).astype(np.float32)))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, T), bool), np.zeros((0, T, 4), np.float32)
    ids, classes, acting, boxes = zip(*rows)
    return np.array(ids, np.int64), np.array(classes, np.int64), np.stack(acting), np.stack(boxes)


def tube_target(video_name: str, indices, track_ids, classes, acting, boxes) -> dict:
    """The training target from :func:`clip_tubes`' arrays (boxes normalised xyxy, maybe augmented).

    ``labels`` (N,) and ``boxes`` (N, 4) cxcywh: the rows acting at the middle step ``T // 2``;
    ``track_ids`` (M,), ``track_labels`` (M, T) int64 (class or -1), ``track_boxes`` (M, T, 4)
    cxcywh (zeros where -1), ``frame_indices`` (T,) int64, ``video``. See :class:`ActionDataset`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    acting = np.asarray(acting, bool).reshape(len(classes), len(idx))
    boxes = np.asarray(boxes, np.float32).reshape(len(classes), len(idx), 4)
    at_mid = acting[:, len(idx) // 2]
    track_boxes = xyxy_to_cxcywh(boxes.reshape(-1, 4)).reshape(boxes.shape)
    track_boxes[~acting] = 0.0
    return {"labels": torch.from_numpy(classes[at_mid]),
            "boxes": torch.from_numpy(xyxy_to_cxcywh(boxes[at_mid, len(idx) // 2])),
            "video": video_name,
            "track_ids": torch.from_numpy(np.asarray(track_ids, np.int64).reshape(-1)),
            "track_labels": torch.from_numpy(np.where(acting, classes[:, None], -1).astype(np.int64)),
            "track_boxes": torch.from_numpy(np.ascontiguousarray(track_boxes)),
            "frame_indices": torch.from_numpy(idx)}


def clip_target(record: VideoRecord, indices) -> dict:
    """The unaugmented target of ``record`` at frames ``indices`` (T,), as :class:`ActionDataset`
    gives it (for evaluating windows, e.g. those of :func:`video_windows`)."""
    return tube_target(record.video, indices, *clip_tubes(record, indices))


# ---------------------------------------------------------------------------- dataset


class ActionDataset(torch.utils.data.Dataset):
    """Clips and targets for training/validation.

    ``__getitem__(i) -> (clip (T, 3, S, S) float32 preprocessed, target)`` with target::

        labels        int64 (N,)          classes acting at the middle step T // 2
        boxes         float32 (N, 4)      their boxes there, cxcywh normalised
        video         str
        track_ids     int64 (M,)          one row per (track, class) acting at any step
        track_labels  int64 (M, T)        the row's class where it acts at that step, else -1
        track_boxes   float32 (M, T, 4)   its box at each step, cxcywh normalised, zeros where -1
        frame_indices int64 (T,)          the decoded frame each step shows (0-based)

    Per-video records (5-field labels): T frames uniformly over the whole video, every row acting at every step
    with the same box (N = M). Per-frame records (``record.tracks``): a window of ``window_frames`` frames (or
    ``window_sec``; None: the whole video), T frames uniform in it; training windows from :func:`training_window`
    (``negative_prob`` of them away from every track), validation's from :func:`validation_window`.

    Augmentation (``augment=True``) is seeded by (seed, epoch, index), so a sample is the same in any worker and
    after a resume; one crop, flip and colour for every frame and box of the clip. ``still_prob``: a clip with an
    action becomes a still clip without one (:func:`still_clip`). ``clips_per_video = n``: index ``copy *
    len(records) + i`` is record i with its own window and augmentation. ``pair_prob``: a per-frame training window
    is shown beside another record's (:func:`side_by_side`). A video that fails to decode is logged and another
    sample is returned.
    """

    def __init__(self, records, num_frames: int, img_size: int, augment: bool = False, seed: int = 0,
                 mean=video.IMAGENET_MEAN, std=video.IMAGENET_STD, still_prob: float = 0.0,
                 window_frames: int | None = None, window_sec: float | None = None,
                 negative_prob: float = NEGATIVE_PROB, clips_per_video: int = 1, pair_prob: float = 0.0):
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        if window_frames is not None and window_sec is not None:
            raise ValueError("give window_frames or window_sec, not both")
        for name, value in (("negative_prob", negative_prob), ("pair_prob", pair_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.records = list(records)
        self.num_frames, self.img_size = int(num_frames), int(img_size)
        self.augment, self.seed, self.epoch = bool(augment), int(seed), 0
        self.still_prob = float(still_prob)
        self.mean, self.std = tuple(mean), tuple(std)
        self.window_frames = None if window_frames is None else int(window_frames)
        self.window_sec = None if window_sec is None else float(window_sec)
        self.negative_prob = float(negative_prob)
        self.clips_per_video = int(clips_per_video)
        self.pair_prob = float(pair_prob)
        self.per_frame = [j for j, r in enumerate(self.records) if r.tracks is not None]   # _paired's partners

    def __len__(self) -> int:
        return len(self.records) * self.clips_per_video

    @property
    def has_action(self) -> list[bool]:
        """Per-sample flag for :class:`BalancedBatchSampler`."""
        return [r.has_action for r in self.records] * self.clips_per_video

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds augmentation and windows (with the seed and the index)."""
        self.epoch = int(epoch)

    def __getitem__(self, index):
        """``index``: an int (augmented as of ``set_epoch``) or ``(index, epoch)`` from
        :class:`EpochTaggedBatches` (persistent workers keep their own copy of this dataset, so
        ``set_epoch`` in the main process does not reach them)."""
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        copy, index = divmod(index, len(self.records))
        # A video that fails now (disk, codec) must not kill a long run: log and use the next.
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                return self._load(i, epoch, copy)
            except video.VideoError as exc:
                log.warning("skipping %s at training time: %s", self.records[i].video, exc)
        raise DatasetError("no video of the dataset could be decoded")

    def _indices(self, num_frames: int, rng) -> np.ndarray:
        if rng is None:
            return video.sample_indices(num_frames, self.num_frames)
        return jittered_indices(num_frames, self.num_frames, rng)

    def _window_indices(self, record: VideoRecord, num_frames: int, rng) -> np.ndarray:
        """The clip's frames (T,) in a window of a per-frame record (``num_frames``: its length)."""
        win = window_length(record, self.window_frames, self.window_sec, num_frames)
        if rng is None:
            start, _ = validation_window(record, win, num_frames)
            return start + video.sample_indices(win, self.num_frames)
        start, _ = training_window(record, win, rng, self.negative_prob, num_frames)
        return start + jittered_indices(win, self.num_frames, rng)

    def _decode(self, record: VideoRecord, plan) -> tuple[np.ndarray, np.ndarray]:
        """Frames at ``plan(num_frames)``; planned again on the true length when the stream ends
        early (a quick probe of a lying container)."""
        idx = plan(record.num_frames)
        frames, decoded = video.decode_frames(record.path, idx)
        if decoded <= idx.max():
            idx = plan(decoded)
            frames, _ = video.decode_frames(record.path, idx)
        return frames, np.asarray(idx, np.int64)

    def _load(self, i: int, epoch: int, copy: int = 0):
        record = self.records[i]
        rng = np.random.default_rng([self.seed, epoch, i, *([copy] if copy else [])]) if self.augment else None
        frames, idx, (track_ids, classes, acting, boxes) = self._sample(record, rng)
        if rng is not None and record.tracks is not None and self.pair_prob and rng.random() < self.pair_prob:
            frames, track_ids, classes, acting, boxes = self._paired(i, rng, frames, track_ids, classes, acting, boxes)
        clip = video.preprocess(frames, self.img_size, self.mean, self.std)
        return clip, tube_target(record.video, idx, track_ids, classes, acting, boxes)

    def _sample(self, record: VideoRecord, rng) -> tuple[np.ndarray, np.ndarray, tuple]:
        """A record's frames (augmented to S x S with ``rng``), their indices and :func:`clip_tubes`' arrays."""
        if record.tracks is None:
            frames, idx = self._decode(record, lambda n: self._indices(n, rng))
        else:
            frames, idx = self._decode(record, lambda n: self._window_indices(record, n, rng))
        track_ids, classes, acting, boxes = clip_tubes(record, idx)
        if rng is not None:
            # every box of the clip (all tracks, all steps) gets the frames' crop and flip
            aug = draw_augmentation(boxes[acting], frames.shape[1:3], rng, self.img_size)
            frames, boxes = aug.apply_frames(frames), boxes.copy()
            boxes[acting] = aug.apply_boxes(boxes[acting])
            if len(classes) and rng.random() < self.still_prob:
                frames, track_ids, classes = still_clip(frames, rng), track_ids[:0], classes[:0]
                acting, boxes = acting[:0], boxes[:0]
        return frames, idx, (track_ids, classes, acting, boxes)

    def _paired(self, i: int, rng, frames, track_ids, classes, acting, boxes) -> tuple:
        """The sample beside a window of another per-frame video (:func:`side_by_side`); unchanged when none fits
        or the other video cannot be decoded. Its tracks get ids after the sample's own."""
        if len(self.per_frame) < 2:
            return frames, track_ids, classes, acting, boxes
        pick = int(rng.integers(len(self.per_frame) - 1))   # any per-frame record but record i (one of them)
        other = self.records[self.per_frame[pick + (pick >= bisect.bisect_left(self.per_frame, i))]]
        try:
            o_frames, _, (o_ids, o_classes, o_acting, o_boxes) = self._sample(other, rng)
        except video.VideoError as exc:
            log.warning("not pairing with %s: %s", other.video, exc)
            return frames, track_ids, classes, acting, boxes
        joined = side_by_side((frames, acting, boxes), (o_frames, o_acting, o_boxes), rng)
        if joined is None:
            return frames, track_ids, classes, acting, boxes
        first_free = int(track_ids.max()) + 1 if len(track_ids) else 0
        return (joined[0], np.concatenate([track_ids, o_ids + first_free]), np.concatenate([classes, o_classes]),
                joined[1], joined[2])


def collate(batch):
    """``[(clip, target), ...] -> (clips (B, T, 3, S, S), [target, ...])``."""
    clips, targets = zip(*batch)
    return torch.stack(clips), list(targets)


# ---------------------------------------------------------------------------- sampler


class BalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices in which every batch holds at least one video with an action.

    Per epoch (``set_epoch``), the order is shuffled with (seed, epoch): every process
    computes the same global batches. Each batch first gets one positive, then the other
    samples are dealt round-robin (at most ``batch_size`` each). There are enough batches
    for every sample to appear once per epoch; the count is a multiple of ``num_replicas``
    and batch b goes to rank ``b % num_replicas``, so ranks get disjoint samples and the same
    number of steps. Only when there are fewer positives than batches are positives reused.
    With ``batch_size=1`` only positives can be used (said in a warning).
    """

    def __init__(self, has_action: Sequence[bool], batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.has_action = [bool(a) for a in has_action]
        if not any(self.has_action):
            raise DatasetError("no training video has an action: cannot build batches with a positive")
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank}/{num_replicas}")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.num_replicas, self.rank, self.epoch = int(num_replicas), int(rank), 0
        if self.batch_size == 1 and not all(self.has_action):
            log.warning("batch size 1: every batch must hold a positive, so videos without action are not used")

    def set_epoch(self, epoch: int) -> None:
        """The epoch that seeds the shuffle (every rank computes the same batches)."""
        self.epoch = int(epoch)

    def _num_batches(self) -> int:
        """Enough batches for every sample, and for the negatives to fit next to one positive
        each without exceeding batch_size; a multiple of num_replicas."""
        n, pos = len(self.has_action), sum(self.has_action)
        if self.batch_size == 1:  # a batch of one must be a positive: negatives cannot be used
            needed = pos
        else:
            needed = max(math.ceil(n / self.batch_size), math.ceil((n - pos) / (self.batch_size - 1)))
        return math.ceil(needed / self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        return self._num_batches() // self.num_replicas

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pos = rng.permutation([i for i, a in enumerate(self.has_action) if a]).tolist()
        neg = [i for i, a in enumerate(self.has_action) if not a]
        n_batches = self._num_batches()
        anchors = [pos[b % len(pos)] for b in range(n_batches)]  # cycles only if too few positives
        rest = rng.permutation(pos[n_batches:] + (neg if self.batch_size > 1 else [])).tolist()
        batches = [[a] for a in anchors]
        for k, i in enumerate(rest):
            batches[k % n_batches].append(i)
        return [rng.permutation(b).tolist() for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank::self.num_replicas]


class EpochTaggedBatches(torch.utils.data.Sampler):
    """Wraps a batch sampler: yields ``[(index, epoch), ...]`` so that the dataset's workers know the
    epoch (for its augmentation seed) without being restarted: DataLoader's persistent workers.
    ``set_epoch`` and ``len`` go to the wrapped sampler."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.epoch = batch_sampler, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch for the wrapped sampler and for the indices yielded."""
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batch_sampler:
            yield [(i, self.epoch) for i in batch]
