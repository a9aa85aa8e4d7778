"""Label files: the parsing of their lines (5 fields, one box for the whole video, or 7 fields, one actor's box at
one frame) into :class:`Instance` and :class:`FrameInstance`, box normalisation and checks, and the class map
from raw class ids to contiguous indices and names.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from problems import WARNING, DatasetError, Problem

LABEL_FORMAT = "<class_id> <x1> <y1> <x2> <y2>"
FRAME_LABEL_FORMAT = "<frame> <track_id> <class_id> <x1> <y1> <x2> <y2>"

# A box with less than this fraction of its area inside the frame is listed (clipped, used): a
# wrong resolution or an x y w h box. Boxes a little outside are normal (actors at the border).
OUTSIDE_WARN_KEEP = 0.5

# Ids (class, track, frame) are stored as int64 tensors: a larger one is a malformed line, not a crash in training.
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
IDS_64_BITS = "ids must fit in 64 bits"


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
