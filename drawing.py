"""Drawing detections on frames: boxes with ``"name 0.87"`` labels in a stable colour per class.

Frames are RGB ``uint8`` numpy arrays of shape ``(H, W, 3)``; boxes are normalised xyxy in ``[0, 1]``.
"""
from __future__ import annotations

import zlib

import cv2
import numpy as np

# Colour-blind-friendly palette (RGB); a class always gets the same colour (crc32 of its name).
_PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
            (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255))


def class_colour(name: str) -> tuple[int, int, int]:
    """Stable RGB colour for a class name (the same in every run and process)."""
    return _PALETTE[zlib.crc32(name.encode("utf-8")) % len(_PALETTE)]


def draw_detections(frame: np.ndarray, detections) -> np.ndarray:
    """Return a copy of ``frame`` (H, W, 3) RGB with boxes and ``"name 0.87"`` labels drawn.

    detections: iterable of ``(class_name, score, (x1, y1, x2, y2))``, box normalised xyxy, or
    ``(class_name, score, box, tag)`` with ``tag`` written after the score (a tube's ``"#3"``).
    Line width and text size scale with the frame so labels stay readable in 4K and 160 px.
    """
    out = np.ascontiguousarray(frame).copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    scale = max(0.35, min(h, w) / 900)
    for name, score, box, *tag in detections:
        colour = class_colour(str(name))
        x1, y1, x2, y2 = (float(v) for v in box)
        p1 = (int(np.clip(x1, 0, 1) * (w - 1)), int(np.clip(y1, 0, 1) * (h - 1)))
        p2 = (int(np.clip(x2, 0, 1) * (w - 1)), int(np.clip(y2, 0, 1) * (h - 1)))
        cv2.rectangle(out, p1, p2, colour, thick)
        text = " ".join([f"{name} {float(score):.2f}", *map(str, tag)])
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        top = p1[1] - th - base - 2 if p1[1] - th - base - 2 >= 0 else p1[1]  # inside if no room
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 2, top + th + base + 2), colour, -1)
        cv2.putText(out, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), thick, cv2.LINE_AA)
    return out
