"""Training data: CSV and label parsing, class-id mapping, validation, split, the clip
dataset with augmentation, and the balanced batch sampler.

Layout (paths in the CSV are relative to the dataset folder)::

    action_challenge.csv   header video_file,label_file; empty label_file = no action
    <video>                any container PyAV reads (.mp4 .avi .mov .mkv ...)
    <label>.txt            one instance a line: <class_id> <x1> <y1> <x2> <y2> (pixels, xyxy)
    classes.txt            optional, one name a line for the sorted raw class ids

Box formats: label files hold pixel xyxy; :class:`VideoRecord` holds normalised xyxy
(divided by the video's real frame size, clipped to [0, 1]); targets returned by
:class:`ActionDataset` hold normalised cxcywh, as the model and losses expect.
"""
from __future__ import annotations

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

import video

CSV_NAME = "action_challenge.csv"
CLASSES_NAME = "classes.txt"
LABEL_FORMAT = "<class_id> <x1> <y1> <x2> <y2>"

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
    that file when it applies, and what is wrong (including what was done about it)."""

    file: str
    line: int | None
    message: str


@dataclasses.dataclass
class VideoRecord:
    """One usable video. ``boxes``: float32 (N, 4) normalised xyxy; ``labels``: N contiguous ids.
    N = 0 for a video without action."""

    video: str
    path: str
    labels: list[int]
    boxes: np.ndarray
    width: int
    height: int
    num_frames: int
    fps: float

    @property
    def has_action(self) -> bool:
        return len(self.labels) > 0


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


def _parse_int(token: str) -> int:
    """Class ids written as '2' or '2.0' (some tools write floats); anything else fails."""
    value = float(token)
    if not value.is_integer():
        raise ValueError(token)
    return int(value)


def parse_label_lines(lines: Sequence[str], file: str) -> tuple[list[Instance], list[Problem], int]:
    """Parse label text lines. Returns (instances, problems, number of data lines).

    Blank lines and ``#`` comments (whole-line or trailing) are ignored; commas count as
    separators. A malformed line becomes a Problem and is skipped."""
    instances, problems, data_lines = [], [], 0
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        data_lines += 1
        tokens = text.split()
        try:
            if len(tokens) != 5:
                raise ValueError("field count")
            raw_id = _parse_int(tokens[0])
            box = tuple(float(t) for t in tokens[1:])
            if not all(math.isfinite(v) for v in box):
                raise ValueError("not finite")
        except ValueError:
            problems.append(Problem(file, number, f"malformed label line {raw.strip()!r} "
                                                  f"(expected '{LABEL_FORMAT}'); line skipped"))
            continue
        instances.append(Instance(raw_id, box, number))
    return instances, problems, data_lines


def parse_label_file(path, file: str | None = None) -> tuple[list[Instance], list[Problem], int]:
    """Read and parse one label file (see :func:`parse_label_lines`); unreadable -> Problem."""
    file = file or os.fspath(path)
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        return [], [Problem(file, None, f"unreadable label file ({exc.strerror or exc})")], 0
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
                                                         f"{ids}; using names action_<id>")]
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


def _load_row(root, line, video_rel, label_rel, probe, problems):
    """Validate one CSV row. Returns (partial record fields, raw instances) or None if skipped."""
    where = f"{CSV_NAME} line {line}"
    if not video_rel:
        problems.append(Problem(CSV_NAME, line, "empty video_file; row skipped"))
        return None
    video_path = _resolve(root, video_rel)
    if not video_path.is_file():
        problems.append(Problem(video_rel, None, f"missing video ({where}); row skipped"))
        return None
    try:
        info = video.probe_video(video_path, count_frames=probe)
    except video.VideoError as exc:
        reason = str(exc).replace(os.fspath(video_path) + ": ", "")
        problems.append(Problem(video_rel, None, f"unreadable or corrupt video: {reason} ({where}); row skipped"))
        return None
    if info.num_frames == 0:
        problems.append(Problem(video_rel, None, f"zero frames ({where}); row skipped"))
        return None
    boxes = []
    if label_rel:
        label_path = _resolve(root, label_rel)
        if not label_path.is_file():
            problems.append(Problem(label_rel, None, f"missing label file ({where}); row skipped"))
            return None
        instances, label_problems, data_lines = parse_label_file(label_path, label_rel)
        problems.extend(label_problems)
        for inst in instances:
            box = normalise_box(inst.box, info.width, info.height)
            if box is None:
                problems.append(Problem(label_rel, inst.line, f"empty box {list(inst.box)} after clipping to "
                                                              f"the {info.width}x{info.height} frame; instance skipped"))
            else:
                boxes.append((inst.raw_id, box))
        if data_lines and not boxes:  # a labelled video must not silently become a negative
            problems.append(Problem(label_rel, None, f"no usable instance ({where}); row skipped"))
            return None
    return (video_rel, os.fspath(video_path.resolve()), info), boxes


def load_dataset(root, class_names=None, probe: bool = True):
    """Read and validate a whole dataset folder. Returns ``(records, class_map, problems)``.

    Every video is opened (size, frame count, first frame decoded) and every label parsed;
    each problem names the file and line, and bad rows are skipped. ``probe=True`` counts
    frames exactly (demuxes each file); ``probe=False`` trusts container counts (faster on
    big datasets; decoding still copes with a wrong count). A label file with no data lines
    is a video without action. Raises DatasetError when the CSV is missing or nothing usable
    remains (``err.problems`` holds the table).
    """
    root = pathlib.Path(root)
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        raise DatasetError(f"no {CSV_NAME} in {root} (expected header video_file,label_file)")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    loaded = []
    for line, video_rel, label_rel in _read_csv(csv_path):
        key = os.path.normpath(video_rel.replace("\\", "/")) if video_rel else ""
        if key and key in seen:
            problems.append(Problem(CSV_NAME, line, f"duplicate row for {video_rel!r} (first at line "
                                                    f"{seen[key]}); row skipped"))
            continue
        seen[key] = line
        row = _load_row(root, line, video_rel, label_rel, probe, problems)
        if row is not None:
            loaded.append(row)
    if not loaded:
        raise DatasetError(f"no usable videos in {csv_path} ({len(problems)} problem(s))", problems)
    raw_ids = [raw for _, boxes in loaded for raw, _ in boxes]
    class_map, class_problems = build_class_map(raw_ids, class_names, root / CLASSES_NAME)
    problems.extend(class_problems)
    records = [_make_record(fields, boxes, class_map) for fields, boxes in loaded]
    return records, class_map, problems


def _make_record(fields, boxes, class_map: ClassMap) -> VideoRecord:
    (video_rel, path, info) = fields
    labels = [class_map.index(raw) for raw, _ in boxes]
    arr = np.stack([b for _, b in boxes]).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return VideoRecord(video_rel, path, labels, arr, info.width, info.height, info.num_frames, info.fps)


def format_problems(problems: Sequence[Problem]) -> str:
    """One table of problems (file, line, problem); 'no problems found' when empty."""
    if not problems:
        return "no problems found in the dataset"
    rows = [(p.file, "-" if p.line is None else str(p.line), p.message) for p in problems]
    wf = max(4, *(len(r[0]) for r in rows))
    wl = max(4, *(len(r[1]) for r in rows))
    lines = [f"{len(problems)} problem(s) in the dataset:",
             f"{'file':<{wf}}  {'line':>{wl}}  problem", f"{'-' * wf}  {'-' * wl}  {'-' * 7}"]
    lines += [f"{f:<{wf}}  {ln:>{wl}}  {m}" for f, ln, m in rows]
    return "\n".join(lines)


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- augmentation

# Augmentation strengths (immutable module constants, not configuration).
MAX_TEMPORAL_SHIFT = 0.5      # fraction of the sampling step the whole grid may move
CROP_SCALE = (0.75, 1.0)      # crop side as a fraction of the frame side
MIN_BOX_KEEP = 0.6            # a crop must keep this fraction of every box's area
COLOUR_JITTER = 0.2           # brightness / contrast / saturation factors in 1 +- this
CHANNEL_SWAP_PROB = 0.5       # random RGB order: colour must not identify a training video
STILL_NOISE = 2.0             # grey levels of per-frame noise on still clips (cameras flicker)


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
    b, c, s = 1 + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    x = frames.astype(np.float32) * b
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * s                 # saturation: away from / towards grey
    x = x.mean() + (x - x.mean()) * c         # contrast: around the clip's mean
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_clip(frames: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, img_size: int):
    """Crop/scale jitter, horizontal flip (p = 0.5) and colour jitter, box-consistent.

    frames (T, H, W, 3) uint8 -> (T, S, S, 3) uint8; boxes (N, 4) normalised xyxy -> same,
    transformed and clipped (never dropped: the crop keeps most of every box)."""
    h, w = frames.shape[1:3]
    crop = random_crop(boxes, rng)
    x1, y1 = int(round(crop[0] * w)), int(round(crop[1] * h))
    x2, y2 = max(x1 + 1, int(round(crop[2] * w))), max(y1 + 1, int(round(crop[3] * h)))
    pixel_crop = (x1 / w, y1 / h, x2 / w, y2 / h)  # the crop actually cut, after rounding
    out = np.stack([cv2.resize(np.ascontiguousarray(f[y1:y2, x1:x2]), (img_size, img_size),
                               interpolation=cv2.INTER_LINEAR) for f in frames])
    boxes = crop_boxes(boxes, pixel_crop)
    if rng.random() < 0.5:
        out, boxes = out[:, :, ::-1], hflip_boxes(boxes)
    if rng.random() < CHANNEL_SWAP_PROB:
        out = out[..., rng.permutation(3)]
    return colour_jitter(out, rng), boxes


def still_clip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame of the clip repeated T times, each copy with its own faint noise: (T, H, W, 3) uint8.

    A still clip of a video with an action is a video without one (same look, no motion): it
    teaches that the action is in the motion, which appearance alone cannot explain."""
    frame = frames[rng.integers(len(frames))].astype(np.float32)
    noise = rng.normal(0.0, STILL_NOISE, size=frames.shape).astype(np.float32)
    return np.clip(np.rint(frame[None] + noise), 0, 255).astype(np.uint8)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) cxcywh (same units)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] + wh / 2, wh], axis=1)


# ---------------------------------------------------------------------------- dataset


class ActionDataset(torch.utils.data.Dataset):
    """Clips and targets for training/validation.

    ``__getitem__(i) -> (clip (T, 3, S, S) float32 preprocessed, target)`` with target
    ``{"labels": int64 (N,), "boxes": float32 (N, 4) cxcywh normalised, "video": str}``.
    Augmentation (``augment=True``, training only) is seeded by (seed, epoch, index): the
    same sample gets the same augmentation in any worker or process, and after a resume.
    With ``still_prob`` > 0 a video with an action becomes, with that probability, a still clip
    without one (:func:`still_clip`).
    """

    def __init__(self, records, num_frames: int, img_size: int, augment: bool = False, seed: int = 0,
                 mean=video.IMAGENET_MEAN, std=video.IMAGENET_STD, still_prob: float = 0.0):
        self.records = list(records)
        self.num_frames, self.img_size = int(num_frames), int(img_size)
        self.augment, self.seed, self.epoch = bool(augment), int(seed), 0
        self.still_prob = float(still_prob)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_action(self) -> list[bool]:
        """Per-sample flag for :class:`BalancedBatchSampler`."""
        return [r.has_action for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index):
        """``index``: an int (augmented as of ``set_epoch``) or ``(index, epoch)`` from
        :class:`EpochTaggedBatches` (persistent workers keep their own copy of this dataset, so
        ``set_epoch`` in the main process does not reach them)."""
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        # A video that fails now (disk, codec) must not kill a long run: log and use the next.
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                return self._load(i, epoch)
            except video.VideoError as exc:
                log.warning("skipping %s at training time: %s", self.records[i].video, exc)
        raise DatasetError("no video of the dataset could be decoded")

    def _indices(self, num_frames: int, rng) -> np.ndarray:
        if rng is None:
            return video.sample_indices(num_frames, self.num_frames)
        return jittered_indices(num_frames, self.num_frames, rng)

    def _load(self, i: int, epoch: int):
        record = self.records[i]
        rng = np.random.default_rng([self.seed, epoch, i]) if self.augment else None
        idx = self._indices(record.num_frames, rng)
        frames, decoded = video.decode_frames(record.path, idx)
        if decoded <= idx.max():  # recorded count too high (quick probe of a lying container)
            frames, _ = video.decode_frames(record.path, self._indices(decoded, rng))
        boxes, labels = record.boxes, np.asarray(record.labels, np.int64).reshape(-1)
        if rng is not None:
            frames, boxes = augment_clip(frames, boxes, rng, self.img_size)
            if len(labels) and rng.random() < self.still_prob:
                frames, boxes, labels = still_clip(frames, rng), boxes[:0], labels[:0]
        clip = video.preprocess(frames, self.img_size, self.mean, self.std)
        target = {"labels": torch.from_numpy(labels),
                  "boxes": torch.from_numpy(xyxy_to_cxcywh(boxes)),
                  "video": record.video}
        return clip, target


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
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batch_sampler:
            yield [(i, self.epoch) for i in batch]
