"""Articulated people for synthetic action videos: a skeleton, its pose over time, its drawing.

A person is a stick skeleton in body units: standing height 1, feet on the ground at y = 0, y
pointing down as in images, x forward along the way the person faces (``facing`` = +1 or -1 in
the frame). It has a head, a neck, a torso, two arms and two legs (upper and lower segments).
Actions are limb motions laid over an idle pose that always sways a little, so that "something
moves" does not tell an action from no action; the pattern of the motion does:

    wave   one arm rises and its forearm swings side to side; the body stays
    jump   crouch, take off (the whole body leaves the ground), land; repeated
    fall   the body tips over to lie on the ground, lies there, and gets up again
    walk   legs and arms swing and the person travels the way it faces
    kick   one leg chambers, kicks forward and comes back; repeated

Everything here is a pure function of its arguments except :func:`draw`, which paints a figure
into a frame and into a mask; the mask's extent is the figure's tight box in that frame.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

ACTIONS = ("wave", "jump", "fall", "walk", "kick")
WALK_SPEED = 0.78       # body units travelled per second at tempo 1 (two steps of a 0.42 rad leg swing)
JUMP_HEIGHT = 0.28      # body units the feet leave the ground at the top of a jump
REACH = 1.4             # highest point of any pose above the ground (jump + raised arms), body units
_CYCLE = {"wave": 0.6, "jump": 0.9, "walk": 1.0, "kick": 1.0}   # seconds per motion cycle at tempo 1
_SHIFT = 4              # cv2 fixed point: coordinates * 16, so figures move by sub-pixel steps


@dataclasses.dataclass(frozen=True)
class Body:
    """Segment lengths in body units (standing height: legs + torso + neck + head diameter = 1)."""

    leg_up: float = 0.245
    leg_lo: float = 0.235
    torso: float = 0.30
    neck: float = 0.05
    head_r: float = 0.085
    arm_up: float = 0.16
    arm_lo: float = 0.15


def random_body(rng: np.random.Generator) -> Body:
    """A body with every segment 8 % longer or shorter at random, scaled back to height 1."""
    fields = {f.name: getattr(Body(), f.name) * rng.uniform(0.92, 1.08) for f in dataclasses.fields(Body)}
    height = fields["leg_up"] + fields["leg_lo"] + fields["torso"] + fields["neck"] + 2 * fields["head_r"]
    return Body(**{k: v / height for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class Style:
    """How a figure is drawn: ``filled`` thick limbs and a solid head, else thin lines; ``width``:
    limb thickness as a fraction of the standing height; colours RGB."""

    filled: bool
    width: float
    skin: tuple[int, int, int]
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]


def _bright(rng: np.random.Generator) -> tuple[int, int, int]:
    """A bright saturated colour of random hue (colour says nothing about the class)."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(190, 256)]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def random_style(rng: np.random.Generator, line_fraction: float, width: tuple[float, float]) -> Style:
    """Line body with probability ``line_fraction``; limb width drawn from ``width``."""
    skin = tuple(int(v) for v in np.clip(np.array([225, 180, 140]) * rng.uniform(0.55, 1.1), 0, 255))
    return Style(bool(rng.random() >= line_fraction), float(rng.uniform(*width)), skin, _bright(rng), _bright(rng))


@dataclasses.dataclass(frozen=True)
class Act:
    """One action of one person: from ``start`` to ``end`` seconds at ``tempo`` (1 = the usual
    speed); ``side``: which arm waves or leg kicks (0 front, 1 back), or which way a fall goes
    (0 forward, 1 backward)."""

    name: str
    start: float
    end: float
    tempo: float = 1.0
    side: int = 0


@dataclasses.dataclass
class Pose:
    """Angles in radians from straight down (+ towards the facing side): ``arms`` and ``legs`` are
    ``[[upper, lower], [upper, lower]]`` (front, back; the lower angle is absolute); ``tilt``: the
    torso's lean from upright; ``lift``: height of the lowest point above the ground; ``roll``:
    rotation of the whole body about the feet (a fall); ``dx``: horizontal shift (sway)."""

    tilt: float
    arms: np.ndarray
    legs: np.ndarray
    lift: float = 0.0
    roll: float = 0.0
    dx: float = 0.0


def idle_pose(t: float, sway: tuple[float, float]) -> Pose:
    """Standing at rest, swaying a little: ``sway = (period seconds, phase)``."""
    w = 2 * np.pi * t / sway[0] + sway[1]
    arm = 0.14 + 0.05 * np.sin(w + 1.0)
    arms = np.array([[arm, arm + 0.12], [-arm, -arm + 0.10]])
    legs = np.array([[0.06, 0.06], [-0.06, -0.06]]) + 0.02 * np.sin(w)
    return Pose(0.035 * np.sin(w), arms, legs, dx=0.012 * np.sin(w + 2.0))


def smooth(x):
    """The smoothstep ramp 3x^2 - 2x^3 of ``x`` clipped to [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _ramp(act: Act) -> float:
    return min(0.3, (act.end - act.start) / 4)


def envelope(act: Act, t: float) -> float:
    """How far into the action the body is, 0 at its start and end, 1 in between (smooth ramps)."""
    r = _ramp(act)
    return float(smooth((t - act.start) / r) * smooth((act.end - t) / r))


def _cycles(act: Act, t: float) -> float:
    """Phase in [0, 1) of a motion repeated a whole number of times over the action."""
    length = act.end - act.start
    n = max(1, int(round(length * act.tempo / _CYCLE[act.name])))
    return (n * (t - act.start) / length) % 1.0


def action_pose(act: Act, t: float, idle: Pose) -> Pose:
    """The pose at time ``t`` (inside the action) as the action's target blended over ``idle``."""
    e, arms, legs, tilt, lift, roll = envelope(act, t), idle.arms.copy(), idle.legs.copy(), idle.tilt, 0.0, 0.0
    s = act.side
    if act.name == "wave":
        swing = 0.55 * np.sin(2 * np.pi * act.tempo * (t - act.start) / _CYCLE["wave"])
        arms[s] = [2.3 * (1 - 2 * s), np.pi * (1 - 2 * s) + swing]
    elif act.name == "jump":
        p = _cycles(act, t)
        air = np.sin(np.pi * (p - 0.3) / 0.4) if 0.3 <= p <= 0.7 else 0.0
        crouch = np.sin(np.pi * p / 0.3) if p < 0.3 else (np.sin(np.pi * (p - 0.7) / 0.3) if p > 0.7 else 0.0)
        up = 0.9 * crouch + 0.3 * air
        legs[:] = [[up, up - 1.6 * crouch - 0.2 * air]] * 2
        arm = -0.6 * crouch + 2.6 * air
        arms[:] = [[arm, arm + 0.2], [arm, arm + 0.2]]
        tilt, lift = 0.3 * crouch, JUMP_HEIGHT * air
    elif act.name == "walk":
        w = 2 * np.pi * act.tempo * (t - act.start) / _CYCLE["walk"]
        for k in (0, 1):
            swing = np.sin(w + k * np.pi)
            legs[k] = [0.42 * swing, 0.42 * swing - 0.55 * max(0.0, np.cos(w + k * np.pi))]
            arms[k] = [-0.35 * swing, -0.35 * swing + 0.25]
        tilt = 0.06
    elif act.name == "kick":
        p = _cycles(act, t)
        up, knee = 1.5 * np.sin(np.pi * p) ** 2, 1.2 * np.sin(2 * np.pi * p) ** 2
        legs[s] = [up, up - knee]
        legs[1 - s] = [-0.1 * up, -0.1 * up]
        arms[:] = [[0.4 * up, 0.6 * up], [-0.35 * up, -0.2 * up]]
        tilt = -0.17 * up
    elif act.name == "fall":
        length = act.end - act.start
        down, rise = min(0.8 / act.tempo, length / 3), min(1.0 / act.tempo, length / 3)
        p = float(smooth((t - act.start) / down) * smooth((act.end - t) / rise))
        roll = (1 - 2 * s) * 1.45 * p
        bend = np.sin(np.pi * p)
        legs = idle.legs + [[0.5 * bend, -0.3 * bend]] * 2
        arms = idle.arms + [[1.6 * bend + 0.3 * p, 1.8 * bend + 0.3 * p]] * 2
        return Pose(idle.tilt + 0.3 * bend, arms, legs, 0.0, roll, idle.dx)   # p ramps the fall itself
    else:
        raise ValueError(f"unknown action {act.name!r}; known: {', '.join(ACTIONS)}")
    return Pose(idle.tilt + e * (tilt - idle.tilt), idle.arms + e * (arms - idle.arms),
                idle.legs + e * (legs - idle.legs), e * lift, roll, idle.dx)


def pose_at(acts, t: float, sway: tuple[float, float]) -> tuple[Pose, Act | None]:
    """The pose at ``t`` and the action under way then (None: idle)."""
    idle = idle_pose(t, sway)
    for act in acts:
        if act.start <= t < act.end:
            return action_pose(act, t, idle), act
    return idle, None


def _ramp_integral(x):
    """Integral of the smooth ramp from 0 to ``x`` (in ramp lengths, clipped to [0, 1])."""
    x = np.clip(x, 0.0, 1.0)
    return x ** 3 - x ** 4 / 2


def walked(acts, t: float) -> float:
    """Body units walked by time ``t`` (the walks' speed times their envelopes, integrated)."""
    total = 0.0
    for act in acts:
        if act.name != "walk" or t <= act.start:
            continue
        r, length, speed = _ramp(act), act.end - act.start, WALK_SPEED * act.tempo
        done = min(t, act.end) - act.start
        if done <= r:                  # speeding up
            total += speed * r * _ramp_integral(done / r)
        elif done <= length - r:       # full speed
            total += speed * (done - r / 2)
        else:                          # slowing down: the whole walk less what is left of it
            total += speed * ((length - r) - r * _ramp_integral((length - done) / r))
    return total


def skeleton(body: Body, pose: Pose, facing: int) -> dict[str, np.ndarray]:
    """Joint positions (body units, feet on the ground unless lifted), keyed ``hip``, ``shoulder``,
    ``neck``, ``head``, ``elbow0/1``, ``hand0/1``, ``knee0/1``, ``foot0/1``."""
    f = float(facing)

    def seg(p, angle, length):
        return p + length * np.array([f * np.sin(angle), np.cos(angle)])

    hip = np.zeros(2)
    up = np.array([f * np.sin(pose.tilt), -np.cos(pose.tilt)])
    shoulder = hip + body.torso * up
    pts = {"hip": hip, "shoulder": shoulder, "neck": shoulder + body.neck * up,
           "head": shoulder + (body.neck + body.head_r) * up}
    for k in (0, 1):
        pts[f"elbow{k}"] = seg(shoulder, pose.arms[k][0], body.arm_up)
        pts[f"hand{k}"] = seg(pts[f"elbow{k}"], pose.arms[k][1], body.arm_lo)
        pts[f"knee{k}"] = seg(hip, pose.legs[k][0], body.leg_up)
        pts[f"foot{k}"] = seg(pts[f"knee{k}"], pose.legs[k][1], body.leg_lo)
    if pose.roll:
        pivot, a = (pts["foot0"] + pts["foot1"]) / 2, f * pose.roll
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = {k: pivot + rot @ (v - pivot) for k, v in pts.items()}
    lowest = max(max(v[1] for v in pts.values()), pts["head"][1] + body.head_r)
    shift = np.array([pose.dx, -pose.lift - lowest])
    return {k: v + shift for k, v in pts.items()}


_LIMBS = (("shoulder", "elbow1", "shirt"), ("elbow1", "hand1", "skin"), ("hip", "knee1", "trousers"),
          ("knee1", "foot1", "trousers"), ("hip", "shoulder", "shirt"), ("shoulder", "neck", "skin"),
          ("hip", "knee0", "trousers"), ("knee0", "foot0", "trousers"), ("shoulder", "elbow0", "shirt"),
          ("elbow0", "hand0", "skin"))   # back limbs first, then torso, front limbs; the head last


def thickness(style: Style, height_px: float) -> int:
    """Limb thickness in pixels of a figure ``height_px`` tall."""
    return max(2, int(round(style.width * height_px))) if style.filled else max(1, int(round(0.015 * height_px)))


def extent(pts: dict, head_r_px: float, thick: int) -> tuple[float, float, float, float]:
    """Pixel xyxy that surely holds the drawn figure (joints in pixels, margins for ink)."""
    xy = np.stack(list(pts.values()))
    pad = thick + 2.0
    head = pts["head"]
    return (min(xy[:, 0].min() - pad, head[0] - head_r_px - pad), min(xy[:, 1].min() - pad, head[1] - head_r_px - pad),
            max(xy[:, 0].max() + pad, head[0] + head_r_px + pad), max(xy[:, 1].max() + pad, head[1] + head_r_px + pad))


def draw(image: np.ndarray, pts: dict, head_r_px: float, thick: int, style: Style, origin=(0, 0),
         mask: bool = False) -> None:
    """Paint the figure (joints ``pts`` in pixels of the full frame) into ``image``, whose pixel (0, 0)
    is the frame's ``origin``; ``mask``: paint 255 everywhere (a single-channel coverage mask)."""
    def fix(p):
        return int(round((p[0] - origin[0]) * 16)), int(round((p[1] - origin[1]) * 16))

    def colour(name):
        return 255 if mask else (getattr(style, name) if style.filled else style.shirt)

    for a, b, part in _LIMBS:
        width = int(round(thick * (1.7 if a == "hip" and b == "shoulder" else 1.0))) if style.filled else thick
        cv2.line(image, fix(pts[a]), fix(pts[b]), colour(part), max(1, width), cv2.LINE_AA, _SHIFT)
    radius = max(16, int(round(head_r_px * 16)))
    cv2.circle(image, fix(pts["head"]), radius, colour("skin"), -1 if style.filled else thick, cv2.LINE_AA, _SHIFT)


def figure_box(pts: dict, head_r_px: float, thick: int, style: Style, width: int, height: int,
               min_visible: float = 0.0):
    """Tight pixel xyxy (x2, y2 exclusive) of the figure's ink inside a ``width`` x ``height`` frame, or
    None when less than ``min_visible`` of its ink (and at least one pixel) is inside."""
    x1, y1, x2, y2 = extent(pts, head_r_px, thick)
    ox, oy = int(np.floor(x1)), int(np.floor(y1))
    roi = np.zeros((int(np.ceil(y2)) + 1 - oy, int(np.ceil(x2)) + 1 - ox), np.uint8)
    draw(roi, pts, head_r_px, thick, style, (ox, oy), mask=True)
    inside = roi[max(0, -oy):max(0, height - oy), max(0, -ox):max(0, width - ox)]
    seen = np.count_nonzero(inside)
    if not seen or seen < min_visible * np.count_nonzero(roi):
        return None
    rows, cols = np.flatnonzero(inside.max(axis=1)), np.flatnonzero(inside.max(axis=0))
    left, top = max(0, ox), max(0, oy)
    return left + int(cols[0]), top + int(rows[0]), left + int(cols[-1]) + 1, top + int(rows[-1]) + 1
