"""Training augmentation: temporal jitter of the sampled frames, one crop, flip, channel order and colour change
per clip applied alike to its frames and boxes (:class:`ClipAugmentation`), still clips, and two clips side by
side.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

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
