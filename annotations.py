"""Readers for other datasets' action annotations, turned into STAR's per-frame label lines.

Formats (DESIGN.md "Tubes"; the CLI is ``tools/import_annotations.py``):

* ``ucf24`` / ``jhmdb``: the ground-truth pickles of ACT and YOWO (``UCF101v2-GT.pkl``,
  ``JHMDB-GT.pkl``): ``labels`` (names), ``gttubes`` {video: {class index: [array (n, 5) of
  frame (1-based), x1, y1, x2, y2 in pixels]}}, ``train_videos`` / ``test_videos`` (one list per
  split), ``nframes``, ``resolution``. Read with a restricted unpickler: only containers, numbers,
  strings and numpy arrays; a pickle naming anything else is refused before any of it runs.
* ``ava``: AVA v2.x CSV rows ``video_id,timestamp,x1,y1,x2,y2,action_id,person_id`` (boxes
  normalised to [0, 1], timestamps in seconds of the movie) and its ``pbtxt`` label map.
* ``cvat``: "CVAT for video 1.1" XML, one file per video.

Every reader returns an :class:`Annotations`: per video key, rows
``(frame, track_id, class_id, x1, y1, x2, y2)`` (0-based frame, pixel xyxy) as annotated, no
interpolation. AVA rows hold the timestamp in the frame field and normalised boxes until the
video's rate and size are known (:func:`ava_rows_to_frames`). A file that is not of the named
format raises :class:`FormatError`, one line naming the file.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import math
import pathlib
import pickle
import re
import xml.etree.ElementTree as ET

import numpy as np

from runtime import UsageError

Row = tuple  # (frame, track_id, class_id, x1, y1, x2, y2)

# Ids become int64 training targets (labels.py refuses larger ones): a reader refuses them where it can name the line.
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
# AVA timestamps are seconds of a movie; beyond this (116 days) one is no time in a video, and 1e308 would overflow
# the frame number it becomes.
MAX_AVA_SECONDS = 1e7
# AVA boxes are normalised to [0, 1]; this much beyond the frame is a box in other units (or garbage), not a
# normalised box near the border.
AVA_BOX_RANGE = (-1.0, 2.0)


class FormatError(UsageError):
    """A file that is not of the named format (or a pickle that names code): one line, exit code 2."""


@dataclasses.dataclass
class Annotations:
    """What a reader found.

    videos: video key (as the annotation names it, e.g. ``Basketball/v_Basketball_g01_c01``) -> rows
        ``(frame, track_id, class_id, x1, y1, x2, y2)``.
    class_names: raw class id -> name, for the ids the rows may use.
    timestamps: AVA: the frame field holds seconds and boxes are normalised (see ava_rows_to_frames).
    notes: lines for the user (rows or labels skipped and why).
    """
    videos: dict[str, list[Row]]
    class_names: dict[int, str]
    timestamps: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------- restricted unpickling


def _numpy_globals() -> dict:
    """(module, name) -> object for what numpy array reconstruction needs, under numpy 1 and 2 names."""
    import codecs
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
               ("collections", "OrderedDict"): collections.OrderedDict}
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    for name in ("set", "frozenset", "bytearray", "complex", "list", "dict", "tuple"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    return allowed


class _Refused(pickle.UnpicklingError):
    pass


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of plain data; any other name stops the load."""
    _allowed = None

    def find_class(self, module, name):
        if _DataUnpickler._allowed is None:
            _DataUnpickler._allowed = _numpy_globals()
        found = _DataUnpickler._allowed.get((module, name))
        if found is None:
            raise _Refused(f"refused: the pickle names {module}.{name}, which is not data")
        return found


def load_data_pickle(path):
    """Load a pickle that holds only data (Python 2 pickles decoded with latin1, or any Python 3
    protocol). Raises FormatError for a pickle that names code or is not a pickle."""
    path = pathlib.Path(path)
    try:
        with path.open("rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise FormatError(f"{path}: {exc}") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError, OverflowError) as exc:  # what malformed pickles raise
        raise FormatError(f"{path}: not a pickle ({type(exc).__name__}: {str(exc)[:120]})") from None


# ---------------------------------------------------------------------------- ACT / YOWO pickles


def _split_list(data: dict, split: str, index: int, path) -> list:
    lists = data.get(f"{split}_videos")
    try:
        return [str(v) for v in lists[index]]
    except (TypeError, KeyError, IndexError):
        count = len(lists) if isinstance(lists, (list, tuple, dict)) else 0
        raise FormatError(f"{path}: no {split} split {index + 1} in '{split}_videos' ({count} split(s))") from None


def read_act_pickle(path, split: str = "all", split_index: int = 0,
                    label_map: dict[int, str] | None = None) -> Annotations:
    """Rows from an ACT/YOWO ground-truth pickle. Each tube is one track (ids 0, 1... per video, in
    class order), frames made 0-based. ``split``: ``train``, ``test`` or ``all`` (every video of
    ``gttubes``); ``split_index``: which of the pickle's split lists (JHMDB has 3; UCF101-24 one).
    Class ids are the pickle's label indices and names its ``labels``; a ``label_map`` {id: name}
    renames by name (a label it lacks is skipped, noted)."""
    data = load_data_pickle(path)
    if not isinstance(data, dict) or not isinstance(data.get("gttubes"), dict):
        what = f"keys {sorted(map(str, data))[:6]}" if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{path}: not an ACT/YOWO ground-truth pickle (no 'gttubes' dict; found {what})")
    try:
        labels = [str(n) for n in data.get("labels", [])]
        keys = sorted(map(str, data["gttubes"])) if split == "all" else _split_list(data, split, split_index, path)
        by_name = {name: i for i, name in (label_map or {}).items()}
        notes, unknown, videos, used = [], set(), {}, {}
        for key in keys:
            videos[key] = _act_video_rows(path, key, data["gttubes"].get(key) or {}, labels, label_map, by_name,
                                          used, unknown)
    except (TypeError, ValueError, AttributeError) as exc:  # a pickle of other data
        raise FormatError(f"{path}: not an ACT/YOWO ground-truth pickle ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None
    if unknown:
        notes.append(f"labels not in --label_map, their tubes skipped: {', '.join(sorted(unknown))}")
    return Annotations(videos, dict(sorted(used.items())), notes=notes)


def _act_video_rows(path, key, tubes_by_label: dict, labels, label_map, by_name, used, unknown) -> list[Row]:
    """Rows of one video of an ACT/YOWO pickle (see read_act_pickle); fills ``used`` and ``unknown``."""
    rows, track = [], 0
    for label, tubes in sorted(tubes_by_label.items()):
        name = labels[int(label)] if 0 <= int(label) < len(labels) else f"action_{int(label)}"
        raw = int(label) if label_map is None else by_name.get(name)
        if raw is None:
            unknown.add(name)
            continue
        used[raw] = name
        for tube in tubes:
            arr = np.asarray(tube, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 5 or len(arr) == 0 or arr[:, 0].min() < 1:
                raise FormatError(f"{path}: video {key!r}: a tube is not an (n, 5) array of 1-based "
                                  f"frame, x1, y1, x2, y2 (shape {arr.shape})")
            rows += [(int(f) - 1, track, raw, x1, y1, x2, y2) for f, x1, y1, x2, y2 in arr.tolist()]
            track += 1
    return rows


# ---------------------------------------------------------------------------- label maps


_BLOCK = re.compile(r"(?:item|label)\s*\{([^}]*)\}", re.S)
_FIELD = re.compile(r"(\w+)\s*:\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s}]+)")


def read_label_map(path) -> dict[int, str]:
    """{id: name} from a label map: AVA's pbtxt (``item { name: "..." id: N }`` or ``label { name:
    "..." label_id: N }``), or a text file of lines ``<id> <name>`` or ``<name>`` (id = line number
    from 0, blank lines and # comments skipped)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the label map ({getattr(exc, 'strerror', None) or exc})") from None
    mapping: dict[int, str] = {}
    if "{" in text:
        for block in _BLOCK.findall(text):
            fields = {k: v.strip("\"'") for k, v in _FIELD.findall(block)}
            ident, name = fields.get("id", fields.get("label_id")), fields.get("name", fields.get("display_name"))
            if ident is None or name is None or not ident.isdigit():
                raise FormatError(f"{path}: a label map entry needs a name and an integer id: {block.strip()[:80]!r}")
            mapping[int(ident)] = name
        if not mapping:
            raise FormatError(f"{path}: no 'item {{ name: ... id: ... }}' entries in the label map")
        return mapping
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for n, line in enumerate(lines):
        head, _, rest = line.partition(" ")
        ident, name = (int(head), rest.strip()) if head.isdigit() and rest.strip() else (n, line)
        mapping[ident] = name
    if not mapping:
        raise FormatError(f"{path}: empty label map")
    return mapping


# ---------------------------------------------------------------------------- AVA


def read_ava(paths, label_map: dict[int, str] | None = None) -> Annotations:
    """Rows ``(timestamp, person_id, action_id, x1, y1, x2, y2 normalised)`` per video from AVA v2.x
    CSVs. Action ids are the raw class ids; names from ``label_map`` (AVA's pbtxt), whose absence of
    an id skips its rows (noted: e.g. the 60-class evaluation subset), else ``action_<id>``."""
    videos: dict[str, set] = collections.defaultdict(set)
    skipped = collections.Counter()
    for path in map(pathlib.Path, paths):
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: not an AVA v2.x CSV ({getattr(exc, 'strerror', None) or exc})") from None
        for n, row in enumerate(csv.reader(lines), start=1):
            if not any(cell.strip() for cell in row):
                continue
            try:
                if len(row) != 8:
                    raise ValueError(f"{len(row)} fields")
                ts, x1, y1, x2, y2 = (float(v) for v in row[1:6])
                action, person = _int64(row[6]), _int64(row[7])
                _check_ava_numbers(ts, (x1, y1, x2, y2))
            except ValueError as exc:
                raise FormatError(f"{path}: line {n}: not an AVA v2.x CSV row video_id,timestamp,x1,y1,x2,y2,"
                                  f"action_id,person_id ({exc}): {','.join(row)[:80]!r}") from None
            if label_map is not None and action not in label_map:
                skipped[action] += 1
                continue
            videos[row[0].strip()].add((ts, person, action, x1, y1, x2, y2))
    used = sorted({r[2] for rows in videos.values() for r in rows})
    names = {a: (label_map or {}).get(a, f"action_{a}") for a in used}
    notes = [f"{sum(skipped.values())} rows of action ids not in --label_map skipped "
             f"({', '.join(map(str, sorted(skipped)))})"] if skipped else []
    return Annotations({k: sorted(v) for k, v in videos.items()}, names, timestamps=True, notes=notes)


def _int64(text: str) -> int:
    """An integer id that fits in 64 bits; ValueError otherwise."""
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("ids must fit in 64 bits")
    return value


def _check_ava_numbers(ts: float, box) -> None:
    """ValueError(reason) for a timestamp or box coordinate that is not finite or out of range (see
    MAX_AVA_SECONDS, AVA_BOX_RANGE)."""
    if not all(math.isfinite(v) for v in (ts, *box)):
        raise ValueError("not finite")
    if abs(ts) > MAX_AVA_SECONDS:
        raise ValueError(f"timestamp {ts:g} is not a second of a video")
    low, high = AVA_BOX_RANGE
    if not all(low <= v <= high for v in box):
        raise ValueError("box not normalised to [0, 1]")


def ava_rows_to_frames(rows, fps: float, offset: float, width: int, height: int) -> list[Row]:
    """AVA rows -> frame rows: frame = round((timestamp - offset) * fps) (half up), boxes scaled to the
    ``width`` x ``height`` video. Several actions of one person at one time keep one frame/track/box."""
    out = []
    for ts, person, action, x1, y1, x2, y2 in rows:
        frame = math.floor((ts - offset) * fps + 0.5)
        out.append((frame, person, action, x1 * width, y1 * height, x2 * width, y2 * height))
    return out


# ---------------------------------------------------------------------------- CVAT for video 1.1


def _cvat_root(path):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not a CVAT for video 1.1 XML file ({str(exc)[:120]})") from None
    if root.tag != "annotations":
        raise FormatError(f"{path}: not a CVAT for video 1.1 XML file (root element <{root.tag}>, not <annotations>)")
    if root.find("image") is not None:
        raise FormatError(f"{path}: a 'CVAT for images' export (<image> elements); export the task as "
                          "'CVAT for video 1.1'")
    return root


def _cvat_key(root, path: pathlib.Path) -> str:
    """The video a CVAT file describes: its <meta> <source>, else the XML file's own stem."""
    meta = root.find("meta")
    source = next((s.text.strip() for s in meta.iter("source") if s.text and s.text.strip()), None) \
        if meta is not None else None
    return source or path.stem


def read_cvat(paths, label_map: dict[int, str] | None = None) -> Annotations:
    """Rows per video from CVAT for video 1.1 XML files (one per video).

    Each ``<track id label>`` is one track (its id kept; a track that leaves and re-enters keeps it).
    A ``<box>`` with ``outside="1"`` marks the frames from it on, up to the track's next box, as
    absent: no line. Other boxes give one line each, keyframes or not: CVAT's exports list every
    frame of an interpolated track; a file with keyframes only keeps them (the dataset interpolates
    gaps up to --max_gap), and since CVAT holds a box until the outside marker, the last box before
    a marker more than one frame later is repeated on the frame before it (a track without a final
    marker ends at its last box). Frames are CVAT's, which
    are the video's frame numbers. Class ids: ``label_map`` {id: name} when given (other labels
    skipped, noted), else the sorted label names of all the files (declared or used) numbered from 0.
    """
    parsed = []
    for path in map(pathlib.Path, paths):
        root = _cvat_root(path)
        declared = {e.text.strip() for e in root.findall("./meta//labels/label/name") if e.text}
        parsed.append((path, root, declared | {t.get("label") for t in root.iter("track") if t.get("label")}))
    if label_map is None:
        names = sorted(set().union(*(p[2] for p in parsed)) if parsed else set())
        ids = {name: i for i, name in enumerate(names)}
    else:
        ids = {name: i for i, name in label_map.items()}
    videos, used, unknown, notes = {}, {}, set(), []
    for path, root, _ in parsed:
        key = _cvat_key(root, path)
        if key in videos:
            notes.append(f"{path}: a second file for video {key!r}; its tracks are added to the first")
        rows = videos.setdefault(key, [])
        for track in root.iter("track"):
            label = track.get("label", "")
            if label not in ids:
                unknown.add(label)
                continue
            used[ids[label]] = label
            rows += _cvat_track_rows(path, track, ids[label])
    if unknown:
        notes.append(f"labels not in --label_map, their tracks skipped: {', '.join(sorted(unknown))}")
    return Annotations({k: sorted(v) for k, v in videos.items()}, dict(sorted(used.items())), notes=notes)


def _cvat_track_rows(path, track, class_id: int) -> list[Row]:
    """Lines of one CVAT track (see read_cvat)."""
    try:
        tid = _int64(track.get("id"))
        boxes = sorted((int(b.get("frame")), b.get("outside", "0") == "1",
                        tuple(float(b.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))) for b in track.iter("box"))
    except (TypeError, ValueError):
        raise FormatError(f"{path}: track {track.get('id')!r}: a <box> without integer frame and numeric "
                          "xtl, ytl, xbr, ybr (or a track without an integer id that fits in 64 bits)") from None
    for frame, _, box in boxes:
        if not all(math.isfinite(v) for v in box):
            raise FormatError(f"{path}: track {tid}: the <box> at frame {frame} has a coordinate that is not a finite "
                              f"number (xtl, ytl, xbr, ybr = {', '.join(f'{v:g}' for v in box)})")
    rows, last = [], None
    for frame, outside, box in boxes:
        if outside:
            if last is not None and last[0] < frame - 1:
                rows.append((frame - 1, tid, class_id, *last[1]))
            last = None
            continue
        rows.append((frame, tid, class_id, *box))
        last = (frame, box)
    return rows
