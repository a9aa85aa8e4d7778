"""A small synthetic action dataset in exactly the training layout (:func:`make_sample_dataset`;
the command line is tools/make_sample_data.py, the web demo's example clips come from here too).

Each video shows one or two bright textured "actors" (ellipses) on a mildly noisy, dim
background. The actions differ only in how the actor moves, so a single frame cannot
tell them apart and the network must use time:

    jump    hops up and down          walk    moves left and right
    wave    swells and shrinks        circle  moves round a circle

About a third of the videos have no action: a static actor (the honest negative: same
look, no motion) or, less often, an empty scene. Some positives have two actors (two
label lines, possibly different classes). The label of an actor is the pixel xyxy box of
the region where it acts: the union of its extent over the whole video. Containers are
mixed: mostly H.264 .mp4, some MJPEG and MPEG-4 .avi, an upper-case .MOV and a .mkv.
Everything is a function of ``seed`` (video i uses the generator seeded with (seed, i)).

With ``per_frame`` the videos are longer (150 frames, 6 s at 25 fps, by default) and the labels are
per-frame tubes (``<frame> <track_id> <class_id> <x1> <y1> <x2> <y2>``): every actor drifts
slowly across the frame for the whole video and performs its action for part of it (35-65 %),
starting and ending at rest; label lines exist only while it acts, each its box in that frame.
Two-actor videos overlap their acting spans (same or different actions). Negatives hold idle
drifting actors. One video in twelve is a folder of numbered JPEG frames (``00001.jpg``...), as
UCF101-24 and JHMDB are distributed. ``label_step`` N writes every N-th acting frame only (sparse
keyframes, as AVA; the dataset interpolates). The default output is unchanged by this option.
"""
from __future__ import annotations

import csv
import pathlib

import cv2
import numpy as np

import video_writer

ACTIONS = ("jump", "walk", "wave", "circle")


def _x264_cpu_cap() -> dict:
    """x264 options that keep it off its AVX-512 code, on CPUs that have AVX-512 (Linux) only.

    Why: x264's AVX-512 code encodes the same frames differently from run to run; capped at AVX2 every run gives
    the same pixels, those of x264 on an AVX2 CPU (docs/EXPERIMENTS.md, "Conventions"). Elsewhere nothing changes."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if " avx512f" in flags else {}


# index % 12 -> (suffix, codec, pixel format, encoder options); H.264 MP4 most of the time
# One x264 thread: with several, the same seed gives different H.264 pixels on a many-core host (docs/EXPERIMENTS.md,
# "Conventions"), so the "same pixels for the same seed" promise needs it; these videos are tiny, a thread costs
# nothing here.
_X264 = {"crf": "18", "preset": "veryfast", "threads": "1", **_x264_cpu_cap()}
_CONTAINERS = {3: (".avi", "mjpeg", "yuvj420p", {"b": "1500000"}),  # default MJPEG/MPEG-4 rates blur
               7: (".avi", "mpeg4", "yuv420p", {"b": "1500000"}),
               10: (".MOV", "libx264", "yuv420p", _X264),
               11: (".mkv", "libx264", "yuv420p", _X264)}
_MP4 = (".mp4", "libx264", "yuv420p", _X264)


def _track(action: str, n: int, region, size: float, rng: np.random.Generator):
    """Per-frame actor ellipse ``(cx, cy, rx, ry)`` as an (n, 4) float array, inside ``region``.

    region: pixel xyxy the whole motion must stay in; size: the actor's half-height in px.
    Motion runs 1 to 1.5 cycles over the video so that any 8 uniformly sampled frames show it.
    """
    rw, rh = region[2] - region[0], region[3] - region[1]
    phase = np.linspace(0, 2 * np.pi * rng.uniform(1.0, 1.5), n) + rng.uniform(0, 2 * np.pi)
    ry = np.full(n, size)
    cx, cy = np.zeros(n), np.zeros(n)
    if action == "jump":  # hops: up from the ground and back
        cy = -rng.uniform(0.22, 0.3) * rh * np.abs(np.sin(phase / 2))
    elif action == "walk":
        cx = rng.uniform(0.18, 0.25) * rw * np.sin(phase)
    elif action == "wave":  # swells and shrinks in place
        ry = size * (1 + 0.45 * np.sin(phase))
    elif action == "circle":
        amp = rng.uniform(0.12, 0.16) * min(rw, rh)
        cx, cy = amp * np.cos(phase), amp * np.sin(phase)
    elif action != "static":
        raise ValueError(f"unknown action {action!r}")
    rx = 0.7 * ry  # upright ellipse, person-like
    lo_x, hi_x = (cx - rx).min(), (cx + rx).max()
    lo_y, hi_y = (cy - ry).min(), (cy + ry).max()
    # place the whole extent uniformly inside the region (2 px margin)
    ox = rng.uniform(region[0] + 2 - lo_x, max(region[0] + 2 - lo_x, region[2] - 2 - hi_x))
    oy = rng.uniform(region[1] + 2 - lo_y, max(region[1] + 2 - lo_y, region[3] - 2 - hi_y))
    return np.stack([cx + ox, cy + oy, rx, ry], axis=1)


def _box(track: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel xyxy union of the actor over all frames (integers enclosing it, in the frame)."""
    x1 = max(0, int(np.floor((track[:, 0] - track[:, 2]).min())))
    y1 = max(0, int(np.floor((track[:, 1] - track[:, 3]).min())))
    x2 = min(width, int(np.ceil((track[:, 0] + track[:, 2]).max())))
    y2 = min(height, int(np.ceil((track[:, 1] + track[:, 3]).max())))
    return x1, y1, x2, y2


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Dim, smoothly varying background with a little static texture: (H, W, 3) float32."""
    base = rng.uniform(30, 80, size=3)
    blobs = cv2.resize(rng.uniform(-25, 25, size=(3, 4, 3)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    return base + blobs + rng.normal(0, 4, size=(height, width, 3)).astype(np.float32)


def _actor_colour(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A bright saturated colour of random hue (so colour says nothing about the class)
    and a darker shade of it for the texture."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(170, 256), rng.integers(200, 256)]]])
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(int)
    return tuple(int(v) for v in rgb), tuple(int(v * 0.55) for v in rgb)


def _draw_actor(frame: np.ndarray, state, colours) -> None:
    """Textured ellipse: filled body, two darker bands and an outline (sub-pixel positions)."""
    cx, cy, rx, ry = state
    shift = 4  # cv2 fixed-point: coordinates * 16 for sub-pixel motion
    c = (int(round(cx * 16)), int(round(cy * 16)))
    axes = (max(1, int(round(rx * 16))), max(1, int(round(ry * 16))))
    cv2.ellipse(frame, c, axes, 0, 0, 360, colours[0], -1, cv2.LINE_AA, shift)
    for k in (-1, 1):  # bands make motion visible inside the body too
        cv2.ellipse(frame, (c[0], c[1] + int(k * ry * 16 * 0.4)), (axes[0] * 3 // 4, axes[1] // 8),
                    0, 0, 360, colours[1], -1, cv2.LINE_AA, shift)
    cv2.ellipse(frame, c, axes, 0, 0, 360, colours[1], 1, cv2.LINE_AA, shift)


def _plan(num_videos: int, num_classes: int, negative_fraction: float, two_actor_fraction: float, seed: int):
    """Per video: list of actions for its actors ([] empty scene, ['static'] negative).
    Classes are balanced over positives; the order is shuffled with the seed."""
    rng = np.random.default_rng([seed, 10**6])
    n_neg = int(round(num_videos * negative_fraction))
    plans = []
    for k in range(num_videos - n_neg):
        first = k % num_classes
        if rng.random() < two_actor_fraction:
            second = first if rng.random() < 0.5 else int(rng.integers(0, num_classes))
            plans.append([first, second])
        else:
            plans.append([first])
    for k in range(n_neg):
        plans.append([] if k % 3 == 2 else ["static"] * (1 + (k % 4 == 1)))
    order = rng.permutation(len(plans))
    return [plans[i] for i in order]


def _make_video(path, plan, class_names, num_frames, width, height, fps, rng, container):
    """Render and encode one video; returns the label lines (raw class id + pixel box)."""
    n = int(rng.integers(max(2, int(0.8 * num_frames)), num_frames + 1))  # lengths vary a little
    size = rng.uniform(0.12, 0.16) * height  # actor half-height: large enough to see at 112 px
    if len(plan) == 2:  # two actors: left and right halves, so their regions do not overlap
        regions = [(0, 0, width / 2, height), (width / 2, 0, width, height)]
    else:
        regions = [(0, 0, width, height)]
    actors = []
    for action, region in zip(plan, regions):
        name = action if action == "static" else class_names[action]
        actors.append((action, _track(name, n, region, size, rng), _actor_colour(rng)))
    background = _background(width, height, rng)
    noise = rng.normal(0, 3, size=(4, height, width, 3)).astype(np.float32)  # cycled: cheap
    suffix, codec, pix_fmt, options = container
    lines = []
    with video_writer.VideoWriter(path, width, height, fps, codec=codec, pix_fmt=pix_fmt, options=options) as writer:
        for t in range(n):
            frame = np.clip(background + noise[rng.integers(0, 4)], 0, 255).astype(np.uint8)
            for _, track, colours in actors:
                _draw_actor(frame, track[t], colours)
            writer.write(frame)
    for action, track, _ in actors:
        if action != "static":
            lines.append(f"{action} " + " ".join(str(v) for v in _box(track, width, height)))
    return lines, n


# Per-frame sample data (--per_frame): longer videos, actors acting for part of them.
PER_FRAME_NUM_FRAMES = 150        # 6 s at 25 fps: a 1-2 s training window is a fraction of it
ACT_SHARE = (0.35, 0.65)          # share of the video an actor acts
CYCLE_FRAMES = (28.0, 40.0)       # one motion cycle: a 32-frame window shows about one
DRIFT_SHARE = (0.25, 0.45)        # how far an actor drifts across its region over the video
FOLDER_EVERY, FOLDER_AT = 12, 5   # video i with i % 12 == 5 is a folder of numbered JPEG frames
_FOLDER = ("/", "jpeg", None, None)
TUBE_HEADER = "# <frame> <track_id> <class_id> <x1> <y1> <x2> <y2>  (0-based frame, pixels; lines only while acting)\n"


def _acting_offsets(action: str, length: int, region, size: float, rng: np.random.Generator):
    """Offsets ``(dx, dy, ry)`` (length,) of an action performed over ``length`` frames: whole motion
    cycles, so it starts and ends at rest (offset 0, radius ``size``) and the idle frames around fit."""
    rw, rh = region[2] - region[0], region[3] - region[1]
    cycles = max(1, int(round(length / rng.uniform(*CYCLE_FRAMES))))
    phase = np.linspace(0, 2 * np.pi * cycles, length)
    dx, dy, ry = np.zeros(length), np.zeros(length), np.full(length, size)
    if action == "jump":
        dy = -rng.uniform(0.22, 0.3) * rh * np.abs(np.sin(phase / 2))
    elif action == "walk":
        dx = rng.uniform(0.18, 0.25) * rw * np.sin(phase)
    elif action == "wave":
        ry = size * (1 + 0.45 * np.sin(phase))
    elif action == "circle":
        amp = rng.uniform(0.12, 0.16) * min(rw, rh)
        dx, dy = amp * (np.cos(phase) - 1), amp * np.sin(phase)
    elif action != "static":
        raise ValueError(f"unknown action {action!r}")
    return dx, dy, ry


def _tube(action: str, n: int, span, region, size: float, rng: np.random.Generator):
    """Per-frame ellipse ``(cx, cy, rx, ry)`` (n, 4) of an actor drifting across ``region`` for the
    whole video and acting during frames ``span = (a, b)`` (at rest outside)."""
    a, b = span
    rw, rh = region[2] - region[0], region[3] - region[1]
    dx, dy, ry = np.zeros(n), np.zeros(n), np.full(n, size)
    dx[a:b], dy[a:b], ry[a:b] = _acting_offsets(action, b - a, region, size, rng)
    rx = 0.7 * ry
    drift = rng.choice([-1.0, 1.0]) * rng.uniform(*DRIFT_SHARE) * rw
    width = (dx + rx).max() - (dx - rx).min()
    drift = np.sign(drift) * max(0.0, min(abs(drift), rw - 4 - width))  # the whole path stays in the region
    cx = dx + np.linspace(0, drift, n)
    cy = dy + np.linspace(0, rng.uniform(-0.08, 0.08) * rh, n)
    lo_x, hi_x, lo_y, hi_y = (cx - rx).min(), (cx + rx).max(), (cy - ry).min(), (cy + ry).max()
    ox = rng.uniform(region[0] + 2 - lo_x, max(region[0] + 2 - lo_x, region[2] - 2 - hi_x))
    oy = rng.uniform(region[1] + 2 - lo_y, max(region[1] + 2 - lo_y, region[3] - 2 - hi_y))
    return np.stack([cx + ox, cy + oy, rx, ry], axis=1)


def _acting_spans(count: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Frames ``[a, b)`` each actor acts; a second actor's span overlaps the first's."""
    spans = []
    for k in range(count):
        length = max(2, int(round(rng.uniform(*ACT_SHARE) * n)))
        if k == 0:
            a = int(rng.integers(0, n - length + 1))
        else:
            a0, b0 = spans[0]
            a = int(np.clip(a0 + rng.uniform(-0.5, 0.5) * (b0 - a0), 0, n - length))
        spans.append((a, a + length))
    return spans


def _tube_lines(track_id: int, class_id: int, track: np.ndarray, span, width: int, height: int,
                step: int) -> list[str]:
    """Per-frame label lines of one actor: every ``step``-th acting frame and the last one."""
    a, b = span
    frames = sorted(set(range(a, b, step)) | {b - 1})
    return [f"{t} {track_id} {class_id} " + " ".join(str(v) for v in _box(track[t:t + 1], width, height))
            for t in frames]


class _FrameFolderWriter:
    """Writes RGB frames as ``00001.jpg``, ``00002.jpg``... into a folder (UCF101-24's layout)."""

    def __init__(self, path):
        self.path, self.count = pathlib.Path(path), 0
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, frame: np.ndarray) -> None:
        self.count += 1
        cv2.imwrite(str(self.path / f"{self.count:05d}.jpg"), frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def _make_tube_video(path, plan, class_names, num_frames, width, height, fps, rng, container, step):
    """Render one per-frame video (file or frame folder); returns its per-frame label lines."""
    n = int(rng.integers(max(2, int(0.8 * num_frames)), num_frames + 1))
    size = rng.uniform(0.12, 0.16) * height
    regions = [(0, 0, width / 2, height), (width / 2, 0, width, height)] if len(plan) == 2 else [(0, 0, width, height)]
    spans = _acting_spans(len(plan), n, rng)
    actors = []
    for action, region, span in zip(plan, regions, spans):
        name = action if action == "static" else class_names[action]
        actors.append((action, span, _tube(name, n, span, region, size, rng), _actor_colour(rng)))
    background = _background(width, height, rng)
    noise = rng.normal(0, 3, size=(4, height, width, 3)).astype(np.float32)
    suffix, codec, pix_fmt, options = container
    writer = (_FrameFolderWriter(path) if container is _FOLDER else
              video_writer.VideoWriter(path, width, height, fps, codec=codec, pix_fmt=pix_fmt, options=options))
    with writer:
        for t in range(n):
            frame = np.clip(background + noise[rng.integers(0, 4)], 0, 255).astype(np.uint8)
            for _, _, track, colours in actors:
                _draw_actor(frame, track[t], colours)
            writer.write(frame)
    lines = []
    for k, (action, span, track, _) in enumerate(actors):
        if action != "static":
            lines += _tube_lines(k + 1, action, track, span, width, height, step)
    return lines, sum(action != "static" for action, *_ in actors)


def _write_tube_videos(root, plans, class_names, num_frames, width, height, fps, seed, step):
    """The per-frame dataset's videos and label files; returns (CSV rows, positives, two-actor, folders)."""
    rows, positives, two_actor, folders = [], 0, 0, 0
    for i, plan in enumerate(plans):
        rng = np.random.default_rng([seed, i])
        container = _FOLDER if i % FOLDER_EVERY == FOLDER_AT else _CONTAINERS.get(i % 12, _MP4)
        video_name = f"video_{i:03d}" + ("" if container is _FOLDER else container[0])
        lines, acting = _make_tube_video(root / video_name, plan, class_names, num_frames, width, height, fps,
                                         rng, container, step)
        folders += container is _FOLDER
        label_name = ""
        if lines:
            label_name = f"video_{i:03d}.txt"
            (root / label_name).write_text(TUBE_HEADER + "\n".join(lines) + "\n")
            positives += 1
            two_actor += acting == 2
        rows.append((video_name, label_name))
    return rows, positives, two_actor, folders


def make_sample_dataset(output_dir, num_videos: int = 48, num_frames: int | None = None, width: int = 160,
                        height: int = 120, fps: float = 25, seed: int = 0, num_classes: int = 3,
                        classes=None, negative_fraction: float = 1 / 3,
                        two_actor_fraction: float = 0.25, per_frame: bool = False, label_step: int = 1) -> dict:
    """Write the dataset into ``output_dir``; returns a summary dict.

    ``classes`` (names from ACTIONS) overrides ``num_classes``. Raw class ids are 0..C-1 in
    the order of ``classes``; ``classes.txt`` names them. Video lengths vary between 80 % and
    100 % of ``num_frames`` (default 80; 150 with ``per_frame``). ``per_frame``: per-frame
    tube labels (see the module docstring), every ``label_step``-th acting frame. Summary keys:
    ``root``, ``csv``, ``class_names``, ``videos``, ``positives``, ``negatives``, ``two_actor``
    (and ``frame_folders`` with ``per_frame``).
    """
    if num_frames is None:
        num_frames = PER_FRAME_NUM_FRAMES if per_frame else 80
    if label_step < 1:
        raise ValueError(f"label_step must be >= 1, got {label_step}")
    if not classes and not 1 <= num_classes <= len(ACTIONS):
        raise ValueError(f"num_classes must be 1 to {len(ACTIONS)} ({', '.join(ACTIONS)}), got {num_classes}")
    class_names = list(classes) if classes else list(ACTIONS[:num_classes])
    unknown = [c for c in class_names if c not in ACTIONS]
    if unknown or len(set(class_names)) != len(class_names) or not class_names:
        raise ValueError(f"classes must be 1 to {len(ACTIONS)} of {ACTIONS}, got {class_names}")
    if width < 32 or height < 32 or num_videos < 1 or num_frames < 2:
        raise ValueError("need width, height >= 32, num_videos >= 1 and num_frames >= 2")
    root = pathlib.Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    plans = _plan(num_videos, len(class_names), negative_fraction, two_actor_fraction, seed)
    if per_frame:
        rows, positives, two_actor, folders = _write_tube_videos(root, plans, class_names, num_frames, width, height,
                                                                 fps, seed, label_step)
        summary = _write_index(root, rows, class_names, positives, two_actor)
        return {**summary, "frame_folders": folders}
    rows, positives, two_actor = [], 0, 0
    for i, plan in enumerate(plans):
        rng = np.random.default_rng([seed, i])
        container = _CONTAINERS.get(i % 12, _MP4)
        video_name = f"video_{i:03d}{container[0]}"
        lines, _ = _make_video(root / video_name, plan, class_names, num_frames, width, height, fps,
                               rng, container)
        label_name = ""
        if lines:
            label_name = f"video_{i:03d}.txt"
            (root / label_name).write_text("# <class_id> <x1> <y1> <x2> <y2>  (pixels, where the actor acts)\n"
                                           + "\n".join(lines) + "\n")
            positives += 1
            two_actor += len(lines) == 2
        rows.append((video_name, label_name))
    return _write_index(root, rows, class_names, positives, two_actor)


def _write_index(root, rows, class_names, positives, two_actor) -> dict:
    """Write the CSV and classes.txt; return the summary."""
    with (root / "action_challenge.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_file", "label_file"])
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    return {"root": str(root), "csv": str(root / "action_challenge.csv"), "class_names": class_names,
            "videos": len(rows), "positives": positives, "negatives": len(rows) - positives,
            "two_actor": two_actor}
