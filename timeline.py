"""The web demo's timeline figures (matplotlib, no pyplot: a figure stays private to its request's thread).

A tube-mode model's timeline has one row per tube id (the ``#id`` of the annotated video and the ``tube_id`` of the
frames CSV): the frames where the tube is present, coloured by class (drawing.class_colour, the annotated video's
colours), with its per-frame score; a clip-mode model's shows each class's best score per clip.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import drawing

if TYPE_CHECKING:
    from detections import VideoResult

# The tube timeline: inches per tube row and around the rows (title, time axis); the figure grows with the rows up
# to TUBE_FIGURE_MAX_INCH, then the rows get thinner and their labels smaller, and beyond TUBE_LABEL_MIN_PT only
# every k-th row is labelled.
TUBE_ROW_INCH, TUBE_FRAME_INCH, TUBE_FIGURE_MAX_INCH = 0.26, 1.1, 14.0
TUBE_LABEL_MAX_PT, TUBE_LABEL_MIN_PT = 9.0, 5.0


def class_scores(queries: list[dict], num_classes: int) -> list[list[float]]:
    """Per class, per clip: the best score of the queries predicting that class (0 when none)."""
    scores = [[0.0] * len(queries) for _ in range(num_classes)]
    for k, pred in enumerate(queries):
        for label, score in zip(pred["labels"].tolist(), pred["scores"].tolist()):
            scores[label][k] = max(scores[label][k], float(score))
    return scores


def result_figure(result: VideoResult, class_names, settings):
    """The page's timeline: one row per tube id for a tube-mode model (:func:`tube_timeline_figure`), else each
    class's best score per clip (:func:`timeline_figure`)."""
    if result.tube_mode:
        info = result.info
        return tube_timeline_figure(result.tubes, info.fps, info.duration_sec, class_names)
    return timeline_figure(result, class_names, settings)


def _rgb(name: str) -> tuple:
    """A class's colour (:func:`drawing.class_colour`, the annotated video's) as matplotlib takes it."""
    return tuple(v / 255 for v in drawing.class_colour(name))


def tube_runs(frames) -> list[tuple[int, int]]:
    """``[first, end)`` of each run of consecutive frames in ``frames`` (ascending): a tube's pieces, its pauses
    between them."""
    frames = [int(f) for f in frames]
    if not frames:
        return []
    runs, start = [], frames[0]
    for prev, cur in zip(frames, frames[1:]):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    runs.append((start, frames[-1] + 1))
    return runs


def tube_label(tube) -> str:
    """A tube's row label: ``#id class score``, the id as in the annotated video and the frames CSV."""
    return f"#{tube.tube_id} {tube.class_name} {tube.score:.2f}"


def no_tubes_figure():
    """The timeline when a tube-mode model found no tube: a line of text, no axes."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 1.0), dpi=100)
    fig.text(0.5, 0.5, "Timeline: no tubes in this video (no actor acted above the score threshold long enough).",
             ha="center", va="center", fontsize=10)
    return fig


def tube_timeline_figure(tubes, fps: float, duration_sec: float, class_names):
    """One row per tube (``tube_id`` order, #1 on top), labelled ``#id class score``: a bar over each run of frames
    where the tube is present (``frames / fps`` seconds; a pause inside the joining gap shows as a gap in the row),
    in its class's colour, and a thin line for its per-frame score (row bottom 0, top 1). The figure grows with the
    rows up to ``TUBE_FIGURE_MAX_INCH``. No tubes: :func:`no_tubes_figure`."""
    from matplotlib.figure import Figure   # no pyplot: figures stay private to the request's thread
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    tubes = sorted(tubes, key=lambda t: t.tube_id)
    if not tubes:
        return no_tubes_figure()
    n = len(tubes)
    height = min(TUBE_FRAME_INCH + TUBE_ROW_INCH * n, TUBE_FIGURE_MAX_INCH)
    row_pt = 72 * (height - TUBE_FRAME_INCH) / n
    fontsize = min(TUBE_LABEL_MAX_PT, 0.75 * row_pt)
    every = max(1, math.ceil(TUBE_LABEL_MIN_PT / fontsize))   # too many rows: label every k-th one
    fontsize = max(fontsize, TUBE_LABEL_MIN_PT)
    fig = Figure(figsize=(8, max(height, 2.0)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    end = max(duration_sec, *((int(t.frames[-1]) + 1) / fps for t in tubes if len(t.frames)), 1e-3)
    for i, t in enumerate(tubes):
        y = n - 1 - i   # the first id on top
        colour = _rgb(t.class_name)
        runs = tube_runs(t.frames)
        bars = ax.broken_barh([(a / fps, (b - a) / fps) for a, b in runs], (y - 0.4, 0.8), facecolors=colour,
                              alpha=0.55, edgecolor=colour, linewidth=0.5, label=tube_label(t))
        bars.set_gid(f"tube-{t.tube_id}")
        xs, ys, k = [], [], 0
        for a, b in runs:   # a NaN between runs: the line breaks where the tube pauses
            if xs:
                xs.append(math.nan)
                ys.append(math.nan)
            for f in range(a, b):
                xs.append((f + 0.5) / fps)
                ys.append(y - 0.4 + 0.8 * float(t.frame_scores[k]))
                k += 1
        ax.plot(xs, ys, color="0.15", linewidth=0.8, gid=f"tube-{t.tube_id}-score")
    ax.set_yticks([n - 1 - i for i in range(0, n, every)], [tube_label(tubes[i]) for i in range(0, n, every)],
                  fontsize=fontsize)
    ax.set(xlim=(0, end), ylim=(-0.6, n - 0.4), xlabel="time (s)")
    ax.set_title("Timeline: one row per tube, #id as in the annotated video and the frames CSV\n"
                 "bar = the frames where it acts (gaps: pauses), line = its score per frame", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    present = list(dict.fromkeys(t.class_name for t in tubes))
    shown = [c for c in class_names if c in present] + [c for c in present if c not in class_names]
    handles = [Patch(facecolor=_rgb(c), alpha=0.55, label=c) for c in shown]
    handles.append(Line2D([], [], color="0.15", linewidth=0.8, label="score (0-1 in the row)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig


def timeline_figure(result: VideoResult, class_names, settings):
    """Score over time per class: one segment per clip (``result.spans``) at its best score, the threshold dashed."""
    from matplotlib.figure import Figure   # no pyplot: figures stay private to the request's thread
    fig = Figure(figsize=(8, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    spans = result.spans
    for c, per_clip in enumerate(class_scores(result.queries, len(class_names))):
        colour = tuple(v / 255 for v in drawing.class_colour(class_names[c]))
        centres = [(s + e) / 2 for s, e in spans]
        ax.hlines(per_clip, [s for s, _ in spans], [e for _, e in spans], colors=[colour], linewidth=3, alpha=0.5)
        ax.plot(centres, per_clip, "o-", color=colour, label=class_names[c], markersize=4)
    ax.axhline(settings.score_threshold, color="0.4", linestyle="--", linewidth=1, label="threshold")
    duration = result.info.duration_sec if result.info else 1.0
    ax.set(xlim=(0, max(duration, 1e-3)), ylim=(0, 1.02), xlabel="time (s)", ylabel="score")
    ax.set_title("Timeline: each class's best score in each clip the network saw", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig
