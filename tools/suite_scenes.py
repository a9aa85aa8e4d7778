"""Scenes of articulated people for the dataset suite (tools/make_suite_data.py): planning a video from a
variant's knobs, the background behind the actors, the camera, and rendering frames with their labels.

A video's plan is drawn from generators seeded with ``(set seed, video index)`` (actors), plus ``1``
(camera, codec quality) and ``2`` (background), so a change of one knob leaves the other draws alone.
Actor positions are pixels of the reference frame (the camera at rest); the camera maps them, the
background and the figures' sizes to the frame: ``p' = zoom * (p - centre) + frame centre``.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING

import cv2
import numpy as np

import synthetic_data as sample
import video
from tools import people

if TYPE_CHECKING:   # the knobs' dataclass lives with the command; this module only reads its fields
    from tools.make_suite_data import SuiteVariant

MEDIA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "media"
SPAN_GAP_SEC = 1.5     # idle seconds between two actions of one actor: more than the dataset's 1 s max_gap
ALSO_ACTS = 0.6        # chance that an actor other than the first acts in a video with action
MIN_VISIBLE = 0.3      # an acting actor is labelled while at least this share of its figure is in view


class FootageMissing(RuntimeError):
    """A footage background was asked for and the media folder holds no video."""


def footage_files(media_dir) -> list[pathlib.Path]:
    """The .mp4 and .avi files of ``media_dir``, sorted (FootageMissing when none)."""
    folder = pathlib.Path(media_dir)
    found = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".mp4", ".avi")) if folder.is_dir() else []
    if not found:
        raise FootageMissing(f"no footage (*.mp4, *.avi) in {folder}: real backgrounds need it (--media_dir)")
    return found


@dataclasses.dataclass
class Actor:
    """One person of a video: reference-frame pixels (camera at rest), ``acts`` with raw class ids."""

    track_id: int
    body: people.Body
    style: people.Style
    height: float
    x: float
    ground: float
    facing: int
    sway: tuple
    acts: list


@dataclasses.dataclass
class VideoPlan:
    """Everything needed to render one video of the people renderer."""

    index: int
    width: int
    height: int
    fps: float
    num_frames: int
    actors: list
    camera: tuple      # (pan dx px, pan dy px, zoom at start, zoom at end)
    codec: tuple       # (kind, quality)
    seed: tuple

    def camera_at(self, frame: int) -> tuple[float, float, float]:
        """Zoom and camera centre (reference pixels) at ``frame``: smooth from start to end."""
        e = float(people.smooth(frame / max(1, self.num_frames - 1)))
        dx, dy, z0, z1 = self.camera
        return z0 + (z1 - z0) * e, self.width / 2 + dx * e, self.height / 2 + dy * e


def _spans(v: SuiteVariant, duration: float, rng) -> list[tuple[float, float]]:
    """Action spans (seconds) of one actor: 1+ actions with SPAN_GAP_SEC idle between, inside the video."""
    k = int(rng.integers(v.actions_per_actor[0], v.actions_per_actor[1] + 1))
    lengths = [min(rng.uniform(*v.action_sec), 0.9 * duration) for _ in range(k)]
    while k > 1 and sum(lengths[:k]) + (k - 1) * SPAN_GAP_SEC > duration:
        k -= 1
    slack = duration - sum(lengths[:k]) - (k - 1) * SPAN_GAP_SEC
    cuts = np.sort(rng.uniform(0, slack, k))
    spans, t = [], float(cuts[0])
    for j in range(k):
        spans.append((t, t + lengths[j]))
        t += lengths[j] + SPAN_GAP_SEC + (float(cuts[j + 1] - cuts[j]) if j + 1 < k else 0.0)
    return spans


def _roles(v: SuiteVariant, num_videos: int, seed: int) -> list[tuple[int, int | None]]:
    """Per video (shuffled): number of actors and the first acting actor's class (None: nobody acts).
    Classes are balanced over videos with action."""
    rng = np.random.default_rng([seed, 10 ** 6])
    n_neg, c = int(round(num_videos * v.negative_fraction)), len(v.class_names())
    roles = [(max(1, int(rng.choice(v.actors))), k % c) for k in range(num_videos - n_neg)]
    roles += [(int(rng.choice(v.actors)), None) for _ in range(n_neg)]
    return [roles[i] for i in rng.permutation(len(roles))]


def plan_video(v: SuiteVariant, index: int, seed: int, num_actors: int, first_class: int | None) -> VideoPlan:
    """Draw one video: size, rate, length, actors (bodies, looks, places, actions), camera, codec."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(s) for s in v.resolutions[int(rng.integers(len(v.resolutions)))])
    fps = float(v.fps[int(rng.integers(len(v.fps)))])
    n = max(2, int(round(rng.uniform(*v.video_sec) * fps)))
    duration, names = n / fps, v.class_names()
    slot_w, centre = width / max(1, num_actors), rng.uniform(0.35, 0.65) * width
    floor = rng.uniform(0.7, 0.95) * height
    actors = []
    for j in range(num_actors):
        h = rng.uniform(*v.actor_scale) * height
        acts = []
        if first_class is not None and (j == 0 or rng.random() < ALSO_ACTS):
            for k, (a, b) in enumerate(_spans(v, duration, rng)):
                cls = first_class if j == 0 and k == 0 else int(rng.integers(len(names)))
                acts.append((people.Act(names[cls], a, b, rng.uniform(*v.tempo), int(rng.integers(2))), cls))
        walk = people.walked([a for a, _ in acts], duration) * h
        facing, margin = int(rng.choice([-1, 1])), 0.35 * h
        if v.occlusion:   # together near the centre; a walker starts on one side and crosses the others
            x = centre + rng.uniform(-0.3, 0.3) * h - facing * walk / 2
        else:             # inside its own stretch of the frame, the walk included where it fits
            lo, hi = j * slot_w + margin, (j + 1) * slot_w - margin - walk
            x = rng.uniform(lo, hi) if hi > lo else j * slot_w + (slot_w - walk) / 2
            x = x if facing > 0 else 2 * j * slot_w + slot_w - x
        top = min(height - 2, people.REACH * h)   # the highest feet line that keeps a jump with raised arms in view
        ground = (float(np.clip(floor + rng.uniform(-0.25, 0.25) * h, top, height - 2)) if v.occlusion
                  else rng.uniform(top, height - 2))   # together: nearly one depth, so the figures overlap
        actors.append(Actor(j + 1, people.random_body(rng), people.random_style(rng, v.line_fraction, v.limb_width),
                            h, x, ground, facing, (rng.uniform(2.5, 4.0), rng.uniform(0, 2 * np.pi)), acts))
    cam = np.random.default_rng([seed, index, 1])
    pan = v.pan * width * cam.choice([-1, 1])
    camera = (pan, 0.15 * pan * cam.choice([-1, 1]), cam.uniform(*v.zoom), cam.uniform(*v.zoom))
    kind = v.codecs[index % len(v.codecs)]
    low, high = v.crf if kind == "h264" else v.mjpeg_q
    quality = int(cam.integers(low, high + 1))
    return VideoPlan(index, width, height, fps, n, sorted(actors, key=lambda a: a.ground), camera, (kind, quality),
                     (seed, index))


def plan_dataset(v: SuiteVariant, num_videos: int, seed: int) -> list[VideoPlan]:
    """The plans of a set of ``num_videos`` videos of the people renderer."""
    return [plan_video(v, i, seed, *role) for i, role in enumerate(_roles(v.validate(), num_videos, seed))]


class _Backdrop:
    """The scene behind the actors on a canvas that covers every camera view; ``origin``: reference
    pixel of the canvas's (0, 0)."""

    def __init__(self, plan: VideoPlan, kind: str, media_dir):
        dx, dy = plan.camera[:2]
        self.origin = (min(0.0, dx), min(0.0, dy))
        self.size = tuple(side + int(np.ceil(abs(d))) + 2 * bool(d)
                          for side, d in ((plan.width, dx), (plan.height, dy)))
        self.kind, self.plan = kind, plan
        rng = np.random.default_rng([*plan.seed, 2])
        w, h = self.size
        if kind == "flat":
            self.still = np.full((h, w, 3), rng.uniform(30, 170, size=3), np.float32)
        elif kind == "noise":
            self.still = sample._background(w, h, rng)
            self.noise = rng.normal(0, 3, size=(4, h, w, 3)).astype(np.float32)
        else:
            files = footage_files(media_dir)
            self.path = files[int(rng.integers(len(files)))]
            info = video.probe_video(self.path)
            self.count, self.rate = max(1, info.num_frames), info.fps
            self.start, self.flip = int(rng.integers(self.count)), bool(rng.integers(2))
            side = min(info.width / w, info.height / h) * rng.uniform(0.7, 1.0)   # crop of the canvas's aspect
            cw, ch = int(w * side), int(h * side)
            x0, y0 = int(rng.integers(0, info.width - cw + 1)), int(rng.integers(0, info.height - ch + 1))
            self.crop, self.frames, self.at = (x0, y0, cw, ch), None, None
        self.rng = rng

    def _footage(self, t: int) -> np.ndarray:
        want = (self.start + int(t / self.plan.fps * self.rate)) % self.count
        if self.frames is None or want < self.at:
            self.close()
            self.frames, self.at, self.current = video.iter_frames(self.path), -1, None
        while self.at < want:
            frame = next(self.frames, None)
            if frame is None:   # the container over-counted: loop early
                self.count = max(1, self.at + 1)
                return self._footage(t)
            self.current, self.at = frame, self.at + 1
        x0, y0, cw, ch = self.crop
        out = cv2.resize(self.current[y0:y0 + ch, x0:x0 + cw], self.size, interpolation=cv2.INTER_AREA)
        return out[:, ::-1] if self.flip else out

    def close(self) -> None:
        """Close the footage decoder, if any."""
        if getattr(self, "frames", None) is not None:
            self.frames.close()
            self.frames = None

    def frame(self, t: int) -> np.ndarray:
        """The canvas at frame ``t``, uint8 RGB."""
        if self.kind == "footage":
            return self._footage(t)
        if self.kind == "noise":
            return np.clip(self.still + self.noise[self.rng.integers(0, 4)], 0, 255).astype(np.uint8)
        return self.still.astype(np.uint8)


def render(plan: VideoPlan, background: str, media_dir=MEDIA_DIR):
    """Yield ``(frame, lines)`` per frame: RGB uint8 and ``[(track_id, raw class id, box)]`` of the actors
    acting in it (tight pixel xyxy of their figure in the frame, MIN_VISIBLE of it in view)."""
    backdrop = _Backdrop(plan, background, media_dir)
    still = plan.camera[:2] == (0.0, 0.0) and plan.camera[2] == plan.camera[3] == 1.0
    try:
        for t in range(plan.num_frames):
            z, cx, cy = plan.camera_at(t)
            canvas = backdrop.frame(t)
            if still:
                frame = np.ascontiguousarray(canvas)
            else:
                m = np.float32([[z, 0, z * (backdrop.origin[0] - cx) + plan.width / 2],
                                [0, z, z * (backdrop.origin[1] - cy) + plan.height / 2]])
                frame = cv2.warpAffine(canvas, m, (plan.width, plan.height), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REFLECT)
            lines, sec = [], t / plan.fps
            for actor in plan.actors:   # sorted far to near: nearer actors drawn over farther ones
                acts = [a for a, _ in actor.acts]
                pose, act = people.pose_at(acts, sec, actor.sway)
                x = actor.x + actor.facing * people.walked(acts, sec) * actor.height
                joints = people.skeleton(actor.body, pose, actor.facing)
                scale = z * actor.height
                pts = {k: np.array([z * (x + actor.height * p[0] - cx) + plan.width / 2,
                                    z * (actor.ground + actor.height * p[1] - cy) + plan.height / 2])
                       for k, p in joints.items()}
                thick, head_r = people.thickness(actor.style, scale), actor.body.head_r * scale
                people.draw(frame, pts, head_r, thick, actor.style)
                if act is not None:
                    box = people.figure_box(pts, head_r, thick, actor.style, plan.width, plan.height, MIN_VISIBLE)
                    if box is not None:
                        lines.append((actor.track_id, next(c for a, c in actor.acts if a is act), box))
            yield frame, lines
    finally:
        backdrop.close()
