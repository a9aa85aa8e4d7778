#!/usr/bin/env python
"""Make the varied dataset suite: named variants of synthetic action videos, each a training set and an
unseen set, in the per-frame training layout, seeded and reproducible.

    python tools/make_suite_data.py --output_dir suite --variants all [--num_videos 72 --num_unseen 24 --seed 0]
    python tools/make_suite_data.py --list
    python tools/make_suite_data.py --output_dir s --variants people_base --actor_scale 0.1 0.5 --fps 15 60

Each variant is a :class:`SuiteVariant` (the table ``SUITE`` below); the knob flags override a field in
every selected variant. ``<output_dir>/<variant>/train`` and ``/unseen`` (other seeds) each hold
``action_challenge.csv``, one per-frame label file per video with action
(``<frame> <track_id> <class_id> <x1> <y1> <x2> <y2>``), ``classes.txt`` (written by
synthetic_data.py's helpers) and the videos; ``<variant>/variant.json`` records the knobs.
One line per set is printed: videos, actors, frames, mean actor height (box height / frame height
over labelled frames) and mean action length.

Renderers: ``people`` draws articulated figures (tools/people.py) whose actions are limb motions; a
label line exists for every frame an actor acts, its box the tight box of the whole figure in that
frame (parts hidden by other actors included, clipped to the frame; no line while less than 30 % of
the figure is in view). Idle actors stand
and sway. Several actors stand in separate stretches of the frame, or with ``occlusion`` close
together, walkers crossing the others; actors lower in the frame are nearer and drawn over the others.
The camera pans and zooms over the whole scene (actors and background), the boxes with it. Backgrounds:
``flat`` colour, ``noise`` (synthetic_data.py's textured background plus sensor noise) or ``footage``
from ``--media_dir`` (looped, cropped, resized; a variant that needs it is skipped with a message when
there is none). ``ellipses`` runs synthetic_data.py's per-frame generator with the knobs it has
(resolution, frame rate, length, classes, negatives, two-actor share).

Everything is a function of ``--seed``; video i of a set draws its actors from the generator seeded with
(set seed, i), its camera and background from their own streams, so changing one knob leaves the others'
draws alone. H.264 is encoded on one thread at AVX2 (synthetic_data.py's settings): same seed, same pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import zlib

import numpy as np

import synthetic_data as sample
import video
import video_writer
from tools import people
from tools.suite_scenes import MEDIA_DIR, FootageMissing, footage_files, plan_dataset, render

BACKGROUNDS, CODECS, RENDERERS = ("flat", "noise", "footage"), ("h264", "mjpeg", "folder"), ("people", "ellipses")


def _knob(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class SuiteVariant:
    """One kind of data. Ranges are ``(low, high)`` drawn uniformly per video (per actor, per action);
    tuples of choices are drawn from per video."""

    renderer: str = _knob("people", "people (articulated figures) or ellipses (synthetic_data.py)")
    classes: tuple = _knob((), "action names (default: the renderer's own: people wave jump fall walk kick)")
    resolutions: tuple = _knob(((320, 240), (400, 300)), "frame sizes WxH to choose from (portrait: W < H)")
    fps: tuple = _knob((25.0,), "frame rates to choose from")
    video_sec: tuple = _knob((3.0, 6.0), "video length range, seconds")
    actor_scale: tuple = _knob((0.18, 0.28), "actor standing height range, fraction of the frame height")
    actors: tuple = _knob((1, 1, 2), "numbers of actors (0-3) to choose from per video")
    negative_fraction: float = _knob(0.25, "share of videos in which nobody acts")
    action_sec: tuple = _knob((1.2, 2.5), "action length range, seconds")
    tempo: tuple = _knob((0.8, 1.25), "motion speed range (1 = a usual pace)")
    actions_per_actor: tuple = _knob((1, 1), "range of actions one actor performs (1.5 s idle between)")
    occlusion: bool = _knob(False, "actors stand together and walkers cross the others")
    pan: float = _knob(0.0, "camera travel over the video, fraction of the frame width")
    zoom: tuple = _knob((1.0, 1.0), "camera zoom range (>= 1); start and end zoom drawn from it")
    background: str = _knob("noise", "flat, noise or footage")
    codecs: tuple = _knob(("h264",), "h264 (.mp4), mjpeg (.avi), folder (JPEG frames): cycled over videos")
    crf: tuple = _knob((18, 18), "H.264 CRF range (higher: lower quality)")
    mjpeg_q: tuple = _knob((3, 3), "MJPEG quantiser range, 2 (best) to 31")
    line_fraction: float = _knob(0.3, "share of actors drawn as thin lines")
    limb_width: tuple = _knob((0.04, 0.08), "limb width range of filled actors, fraction of their height")
    num_videos: int = _knob(72, "training videos")
    num_unseen: int = _knob(24, "unseen videos")
    held_out: bool = dataclasses.field(default=False, metadata={"help": None})

    def class_names(self) -> list[str]:
        default = people.ACTIONS if self.renderer == "people" else sample.ACTIONS[:3]
        return list(self.classes or default)

    def validate(self) -> "SuiteVariant":
        """Raise ValueError naming the first knob out of range; return self."""
        def rng_ok(r, lo, hi):
            return len(r) == 2 and lo <= r[0] <= r[1] <= hi

        known = people.ACTIONS if self.renderer == "people" else sample.ACTIONS
        checks = [("renderer", self.renderer in RENDERERS), ("classes", set(self.class_names()) <= set(known)),
                  ("resolutions", bool(self.resolutions) and all(len(r) == 2 and min(r) >= 32
                                                                 for r in self.resolutions)),
                  ("fps", bool(self.fps) and all(0 < f <= 240 for f in self.fps)),
                  ("video_sec", rng_ok(self.video_sec, 0.1, 600)), ("actor_scale", rng_ok(self.actor_scale, 0.02, 1)),
                  ("actors", bool(self.actors) and all(0 <= a <= 3 for a in self.actors)),
                  ("negative_fraction", 0 <= self.negative_fraction <= 1 and (max(self.actors) > 0 or
                                                                              self.negative_fraction == 1)),
                  ("action_sec", rng_ok(self.action_sec, 0.1, 600)), ("tempo", rng_ok(self.tempo, 0.1, 10)),
                  ("actions_per_actor", rng_ok(self.actions_per_actor, 1, 100)), ("pan", 0 <= self.pan <= 2),
                  ("zoom", rng_ok(self.zoom, 1, 4)), ("background", self.background in BACKGROUNDS),
                  ("codecs", bool(self.codecs) and set(self.codecs) <= set(CODECS)),
                  ("crf", rng_ok(self.crf, 0, 51)), ("mjpeg_q", rng_ok(self.mjpeg_q, 2, 31)),
                  ("line_fraction", 0 <= self.line_fraction <= 1), ("limb_width", rng_ok(self.limb_width, 0.005, 0.3)),
                  ("num_videos", self.num_videos >= 1), ("num_unseen", self.num_unseen >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"knob {name} out of range: {getattr(self, name)!r} ({_help(name)})")
        return self


def _help(name: str) -> str:
    return {f.name: f.metadata.get("help") for f in dataclasses.fields(SuiteVariant)}[name]


# The suite: each variant moves one thing away from people_base (4:3 320x240-400x300 at 25 fps, 3-6 s,
# actors 0.18-0.28 of the frame height, 1-2 actors, one 1.2-2.5 s action each, textured background, H.264
# CRF 18); the two held out are kept out of every choice until the end and reported apart.
V = SuiteVariant
SUITE: dict[str, SuiteVariant] = {
    "people_base": V(),
    "small_actors": V(actor_scale=(0.10, 0.15)),
    "large_actors": V(actor_scale=(0.35, 0.50), resolutions=((320, 240),)),
    "long_videos": V(video_sec=(15.0, 30.0), actions_per_actor=(1, 4)),
    "short_fast": V(video_sec=(2.0, 3.0), action_sec=(0.5, 1.0), tempo=(1.6, 2.2)),
    "slow_long_actions": V(video_sec=(6.0, 10.0), action_sec=(3.0, 6.0), tempo=(0.5, 0.7)),
    "portrait_30fps": V(resolutions=((240, 426), (270, 480)), fps=(30.0,)),
    "fps_15_60": V(fps=(15.0, 60.0), held_out=True),
    "crowd_occlusion": V(actors=(0, 2, 3, 3), occlusion=True, negative_fraction=0.2),
    "pan_zoom": V(pan=0.35, zoom=(1.0, 1.5), actors=(1, 2)),
    "flat_lines": V(background="flat", line_fraction=0.8, limb_width=(0.03, 0.12)),
    "real_background": V(background="footage", held_out=True),
    "low_quality": V(codecs=("h264", "mjpeg"), crf=(36, 44), mjpeg_q=(18, 28), resolutions=((320, 240),)),
    "ellipses": V(renderer="ellipses", resolutions=((320, 240),), video_sec=(6.0, 6.0), actors=(1, 1, 1, 2)),
}
del V


def _writer(path: pathlib.Path, plan):
    """The writer of one video: H.264 .mp4 at the plan's CRF, MJPEG .avi at its quantiser, or JPEG frames."""
    kind, quality = plan.codec
    if kind == "folder":
        return sample._FrameFolderWriter(path)
    if kind == "mjpeg":
        return video_writer.VideoWriter(path, plan.width, plan.height, plan.fps, codec="mjpeg", pix_fmt="yuvj420p",
                                        options={"qmin": str(quality), "qmax": str(quality)})
    return video_writer.VideoWriter(path, plan.width, plan.height, plan.fps,
                                    options={**sample._X264, "crf": str(quality)})   # one thread, AVX2: same pixels


def write_people(v: SuiteVariant, root, num_videos: int, seed: int, media_dir=MEDIA_DIR) -> dict:
    """Render and write one set of the people renderer into ``root``; returns its statistics."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if v.background == "footage":
        footage_files(media_dir)
    rows, infos, positives, two_actor, actors = [], {}, 0, 0, 0
    for plan in plan_dataset(v, num_videos, seed):
        suffix = {"h264": ".mp4", "mjpeg": ".avi", "folder": ""}[plan.codec[0]]
        name, lines = f"video_{plan.index:03d}{suffix}", []
        with _writer(root / name, plan) as writer:
            for t, (frame, found) in enumerate(render(plan, v.background, media_dir)):
                writer.write(frame)
                lines += [f"{t} {track} {cls} {x1} {y1} {x2} {y2}" for track, cls, (x1, y1, x2, y2) in found]
        label = ""
        if lines:
            label = f"video_{plan.index:03d}.txt"
            (root / label).write_text(sample.TUBE_HEADER + "\n".join(lines) + "\n")
            positives += 1
            two_actor += len({ln.split()[1] for ln in lines}) >= 2
        rows.append((name, label))
        infos[name] = (plan.num_frames, plan.fps, plan.height)
        actors += len(plan.actors)
    sample._write_index(root, rows, v.class_names(), positives, two_actor)
    return {**label_stats(root, infos), "actors": actors}


_ELLIPSE_KNOBS = {"renderer", "classes", "resolutions", "fps", "video_sec", "actors", "negative_fraction",
                  "num_videos", "num_unseen", "held_out"}   # only the first resolution and frame rate


def write_ellipses(v: SuiteVariant, root, num_videos: int, seed: int) -> dict:
    """One set of synthetic_data.py's per-frame ellipses with this variant's knobs it has."""
    width, height = v.resolutions[0]
    multi = sum(a >= 2 for a in v.actors) / len(v.actors)
    sample.make_sample_dataset(root, num_videos, int(round(v.video_sec[1] * v.fps[0])), width, height, v.fps[0],
                               seed, classes=v.class_names(), negative_fraction=v.negative_fraction,
                               two_actor_fraction=multi, per_frame=True)
    root = pathlib.Path(root)
    names = [line.split(",")[0] for line in (root / "action_challenge.csv").read_text().splitlines()[1:]]
    infos = {}
    for name in names:
        info = video.probe_video(root / name, fps=v.fps[0])
        infos[name] = (info.num_frames, info.fps, info.height)
    return {**label_stats(root, infos), "actors": None}


def label_stats(root, infos: dict) -> dict:
    """Set statistics from its CSV and label files (``infos[video] = (frames, fps, height)``): videos, with action,
    with 2+ acting actors, raw class ids used, frames, actions (track segments), mean box height / frame height
    over labelled frames, mean action seconds."""
    root = pathlib.Path(root)
    heights, seconds, positives, multi, classes = [], [], 0, 0, set()
    for row in (root / "action_challenge.csv").read_text().splitlines()[1:]:
        name, label = row.split(",")
        if not label:
            continue
        _, fps, height = infos[name]
        tracks: dict[str, list[int]] = {}
        for line in (root / label).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                f = line.split()
                tracks.setdefault(f[1], []).append(int(f[0]))
                classes.add(int(f[2]))
                heights.append((int(f[6]) - int(f[4])) / height)
        positives, multi = positives + 1, multi + (len(tracks) >= 2)
        for frames in tracks.values():
            frames = np.unique(frames)
            seconds += [len(s) / fps for s in np.split(frames, np.flatnonzero(np.diff(frames) > 1) + 1)]
    return {"videos": len(infos), "positives": positives, "multi_actor": multi, "classes": sorted(classes),
            "frames": sum(i[0] for i in infos.values()), "tracks": len(seconds),
            "height": float(np.mean(heights)) if heights else 0.0,
            "action_sec": float(np.mean(seconds)) if seconds else 0.0}


def split_seed(seed: int, name: str, split: str) -> int:
    """The seed of one set: a stable function of the suite seed, the variant's name and the split."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())]).generate_state(1)
    return int(state[0])


def make_variant(name: str, v: SuiteVariant, output_dir, seed: int = 0, num_videos: int | None = None,
                 num_unseen: int | None = None, media_dir=MEDIA_DIR) -> dict:
    """Write ``output_dir/name/{train,unseen}`` and ``variant.json``; returns ``{split: stats}``."""
    v.validate()
    if v.renderer == "ellipses":
        idle = [f.name for f in dataclasses.fields(v) if f.name not in _ELLIPSE_KNOBS
                and getattr(v, f.name) != getattr(SuiteVariant(), f.name)]
        if idle:
            print(f"{name}: the ellipses renderer has no knob {', '.join(idle)} (ignored)")
    folder = pathlib.Path(output_dir) / name
    sizes = {"train": v.num_videos if num_videos is None else num_videos,
             "unseen": v.num_unseen if num_unseen is None else num_unseen}
    if v.renderer == "people" and v.background == "footage":
        footage_files(media_dir)   # FootageMissing before anything is written
    out = {}
    for split, count in sizes.items():
        if count < 1:
            continue
        s, start = split_seed(seed, name, split), time.perf_counter()
        out[split] = (write_people(v, folder / split, count, s, media_dir) if v.renderer == "people"
                      else write_ellipses(v, folder / split, count, s))
        out[split].update(seed=s, seconds=time.perf_counter() - start,
                          missing=[c for i, c in enumerate(v.class_names()) if i not in out[split]["classes"]])
    (folder / "variant.json").write_text(json.dumps({"name": name, **dataclasses.asdict(v), "seed": seed,
                                                     "sets": {k: {"videos": sizes[k], "seed": o["seed"]}
                                                              for k, o in out.items()}}, indent=1) + "\n")
    return out


def summary_line(name: str, split: str, s: dict) -> str:
    """One printed line of a set's statistics."""
    actors = "-" if s["actors"] is None else s["actors"]
    missing = s.get("missing")   # classes.txt then does not fit the ids in use: labels.py names them action_<id>
    return (f"{name}/{split}: {s['videos']} videos ({s['positives']} with action, {s['multi_actor']} multi-actor), "
            f"{actors} actors, {s['tracks']} actions, {s['frames']} frames, actor height {s['height']:.2f} of the "
            f"frame, action {s['action_sec']:.1f} s mean ({s['seconds']:.1f} s)"
            + (f"; no {', '.join(missing)} in this set (too few videos for every class)" if missing else ""))


def _parse_knob(name: str, default, values: list[str]):
    """A knob flag's words as the field's type: ``WxH`` sizes, yes/no, a tuple (spaces or commas), a number."""
    values = values if isinstance(values, list) else [values]
    if name == "resolutions":
        return tuple(tuple(int(n) for n in v.lower().split("x")) for v in values)
    if isinstance(default, bool):
        return values[0].lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        return tuple(kind(x) for v in values for x in v.split(",") if x)
    return type(default)(values[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="suite", help="suite folder (default: suite)")
    p.add_argument("--variants", default="all", help=f"comma-separated names or all: {', '.join(SUITE)}")
    p.add_argument("--num_videos", type=int, default=None, help="training videos per variant (default: its own)")
    p.add_argument("--num_unseen", type=int, default=None, help="unseen videos per variant (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="everything is a function of the seed")
    p.add_argument("--media_dir", default=str(MEDIA_DIR), help="footage for real backgrounds (*.mp4, *.avi)")
    p.add_argument("--list", action="store_true", help="print the suite's variants and exit")
    knobs = p.add_argument_group("knobs (override the field in every selected variant)")
    for f in dataclasses.fields(SuiteVariant):
        if f.metadata.get("help") and f.name not in ("num_videos", "num_unseen"):
            many = isinstance(f.default, tuple)
            knobs.add_argument(f"--{f.name}", nargs="+" if many else None, metavar="V", help=f.metadata["help"])
    args = p.parse_args(argv)
    names = list(SUITE) if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(SUITE)}", file=sys.stderr)
        return 2
    try:
        overrides = {f.name: _parse_knob(f.name, f.default, getattr(args, f.name))
                     for f in dataclasses.fields(SuiteVariant) if f.metadata.get("help")
                     and f.name not in ("num_videos", "num_unseen") and getattr(args, f.name)}
    except ValueError as exc:
        p.error(f"a knob flag does not parse: {exc}")
    if args.list:
        for n in names:
            changed = {k: v for k, v in dataclasses.asdict(SUITE[n]).items() if v != getattr(SuiteVariant(), k)}
            print(f"{n}{' (held out)' if SUITE[n].held_out else ''}: {changed or 'the defaults'}")
        return 0
    written = 0
    for name in names:
        try:
            v = dataclasses.replace(SUITE[name], **overrides).validate()
            stats = make_variant(name, v, args.output_dir, args.seed, args.num_videos, args.num_unseen,
                                 args.media_dir)
        except FootageMissing as exc:
            print(f"{name}: skipped, {exc}")
            continue
        except (ValueError, video.VideoError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        for split, s in stats.items():
            print(summary_line(name, split, s), flush=True)
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
