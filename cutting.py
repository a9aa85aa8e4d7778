"""The one rule for how a video is cut into windows, used by test.py, stream.py, app.py and export.py:
:func:`choose_cut`. Where the windows of a cut fall in a video is ``video.window_spans``."""
from __future__ import annotations

import dataclasses

from model_description import ModelDescription
from runtime import UsageError

ASKED, TRAINED, WHOLE, LONG = "asked", "trained", "whole", "long video"


@dataclasses.dataclass(frozen=True)
class Cut:
    """Windows of ``window_sec`` seconds every ``stride_sec`` seconds, or (both None) the whole video as one clip,
    its T frames sampled uniformly (the published behaviour). ``why``: which case of :func:`choose_cut` chose it."""

    window_sec: float | None = None
    stride_sec: float | None = None
    why: str = WHOLE


def choose_cut(model: ModelDescription | None = None, window_sec: float | None = None,
               stride_sec: float | None = None, *, whole: bool = False, duration_sec: float | None = None,
               longest_whole_sec: float | None = None) -> Cut:
    """How to cut a video, the first case that applies:

    1. ``whole`` asked for (the web page's "Whole clip"): the whole video, unless it lasts longer than
       ``longest_whole_sec`` (``duration_sec``): then windows of ``window_sec`` every ``stride_sec`` (``LONG``);
    2. ``window_sec`` given (``--window_sec``, the page's windows, stream.py's ``--clip_sec``): windows of it every
       ``stride_sec``, by default back to back (``ASKED``);
    3. a ``model`` trained on windows: those windows, every ``stride_sec`` when given, else every
       :attr:`ModelDescription.stride_sec` (``TRAINED``);
    4. the whole video (``WHOLE``); a ``stride_sec`` then has no window to stride: UsageError.

    Window and stride come back as floats (``float()`` raises TypeError or ValueError on what is not a number).
    """
    if whole:
        if longest_whole_sec is not None and duration_sec is not None and duration_sec > longest_whole_sec:
            return Cut(float(window_sec), float(stride_sec), LONG)
        return Cut()
    if window_sec is not None:
        return Cut(float(window_sec), float(stride_sec if stride_sec is not None else window_sec), ASKED)
    if model is not None and model.window_sec:
        return Cut(float(model.window_sec), float(stride_sec or model.stride_sec), TRAINED)
    if stride_sec is not None:
        raise UsageError("--stride_sec needs --window_sec")
    return Cut()
