#!/usr/bin/env python
"""STAR web demo: a local page where you drop a video and watch the detected actions.

    python app.py --model_path best_model.pth [--host 127.0.0.1] [--port 7860]

Upload a video (or pick a bundled example), choose the score threshold and whole clip vs windows; the
page shows the annotated H.264 video, the detections table, a timeline and the predictions CSVs (per tube;
per tube per frame) to download. The timeline of a tube-mode model has one row per tube id (the ``#id`` of the
annotated video and the ``tube_id`` of the frames CSV): the frames where the tube is present, coloured by class,
with its per-frame score; a clip-mode model's shows each class's best score per clip. Everything runs through
``inference.py`` (the pipeline of test.py); the model is loaded once per process; requests wait in Gradio's queue, at
most ``--concurrency`` at once.
Offline: Gradio serves its own JS/CSS, the theme uses system fonts, analytics are off, nothing is
downloaded. :meth:`DemoApp.predict` is the page's prediction function, usable without a server.
"""
from __future__ import annotations

import os

# No telemetry and no version check: set before anything imports gradio.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import checkpoint  # noqa: E402
import inference  # noqa: E402
import video  # noqa: E402
from runtime import (UsageError, autocast_settings, number, one_line, resolve_device, run_cli,  # noqa: E402
                     setup_logging, writable_dir)

log = logging.getLogger("star.app")

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "demo_output" / "run" / "best_model.pth"   # what demo.sh trains
MEDIA_DIR = ROOT.parent / "shared" / "media"                      # real footage, when present
NO_MODEL_LINE = ("No model loaded: run `bash demo.sh` to train one (demo_output/run/best_model.pth), "
                 "or start the page with `python app.py --model_path best_model.pth`.")
AUTO_WINDOW_SEC = 20.0      # longer videos are cut into windows even in whole-clip mode
DEFAULT_WINDOW_SEC, DEFAULT_STRIDE_SEC = 4.0, 2.0
WHOLE, WINDOWS = "Whole clip", "Windows"
TABLE_HEADERS = ["class", "score", "start (s)", "end (s)", "box x1, y1, x2, y2 (0-1)"]
TUBE_TABLE_HEADERS = ["tube_id", *TABLE_HEADERS]   # tube mode: each row is one tube, its id first
# The tube timeline: inches per tube row and around the rows (title, time axis); the figure grows with the rows up
# to TUBE_FIGURE_MAX_INCH, then the rows get thinner and their labels smaller, and beyond TUBE_LABEL_MIN_PT only
# every k-th row is labelled.
TUBE_ROW_INCH, TUBE_FRAME_INCH, TUBE_FIGURE_MAX_INCH = 0.26, 1.1, 14.0
TUBE_LABEL_MAX_PT, TUBE_LABEL_MIN_PT = 9.0, 5.0
RESULT_MAX_AGE_SEC = 3600   # request folders older than this are removed (Gradio keeps its own copies)
MAX_UPLOAD_MB = 10_000      # --max_upload_mb above this (10 GB) is refused: far beyond any video of --max_seconds
QUEUE_SIZE = 32             # requests waiting beyond this are refused by Gradio with a message
SAMPLE_VIDEOS, SAMPLE_SEED, SAMPLE_EXAMPLES = 8, 1, 3
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")
CSS = """
#status p { margin: 0; font-size: 1.05em; }
#no-model * { color: #b45309 !important; font-weight: 600; }
footer { display: none !important; }
"""


def no_progress(_fraction: float, desc: str | None = None) -> None:
    """Stand-in for ``gr.Progress`` when the prediction runs without a page."""


class InputProblem(Exception):
    """Input the page cannot use; its message is the one line shown to the user."""


@dataclasses.dataclass
class Limits:
    """What the page accepts."""

    max_upload_mb: float = 200.0
    max_seconds: float = 300.0

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit as Gradio takes it: whole bytes (its "<n>mb" strings take whole numbers only)."""
        return max(1, math.ceil(self.max_upload_mb * 1e6))


@dataclasses.dataclass
class Outcome:
    """One request's answer: a one-line ``message`` always; the rest only when ``ok``."""

    message: str
    ok: bool = False
    video: str | None = None
    rows: list = dataclasses.field(default_factory=list)
    figure: Any = None
    files: list = dataclasses.field(default_factory=list)
    headers: list = dataclasses.field(default_factory=lambda: list(TABLE_HEADERS))   # the table's columns

    def table(self) -> dict:
        """The table's value as ``gr.Dataframe`` takes it: its columns (tube mode adds ``tube_id``) and rows."""
        return {"headers": self.headers, "data": self.rows}

    def outputs(self) -> tuple:
        """The values of the page's output components, in ``build_ui``'s order."""
        return self.video, self.table(), self.figure, self.files or None, self.message


# --------------------------------------------------------------------------- the prediction function


class DemoApp:
    """The loaded model (or None with the reason) and the per-request prediction function."""

    def __init__(self, model, info: dict | None, device, dtype, work_dir, limits: Limits | None = None,
                 missing: str = NO_MODEL_LINE, batch_size: int = 1):
        self.model, self.info, self.device, self.dtype = model, info, device, dtype
        self.work_dir = pathlib.Path(work_dir)
        self.limits = limits or Limits()
        self.missing, self.batch_size = missing, batch_size

    def predict(self, video_path, threshold: float = 0.5, mode: str = WHOLE, window_sec: float = DEFAULT_WINDOW_SEC,
                stride_sec: float = DEFAULT_STRIDE_SEC, progress: Callable = no_progress) -> Outcome:
        """Detect actions in one video: annotated video, table rows, timeline figure, CSV path.
        Bad input gives an Outcome with ``ok=False`` and a one-line message, never an exception."""
        if self.model is None:
            return Outcome(self.missing)
        started = time.perf_counter()
        try:
            progress(0.02, desc="checking the video")
            vinfo = self.check_video(video_path)
            settings, note = self.settings_for(vinfo, threshold, mode, window_sec, stride_sec)
            return self._predict(pathlib.Path(video_path), vinfo, settings, note, started, progress)
        except InputProblem as err:
            log.warning("request refused: %s", err)
            return Outcome(str(err))

    def check_video(self, video_path) -> video.VideoInfo:
        """The video's size, rate and length, or InputProblem saying why the page cannot take it."""
        if not video_path:
            raise InputProblem("Upload a video or pick an example first.")
        path = pathlib.Path(video_path)
        if not path.is_file():
            raise InputProblem(f"{path.name}: the uploaded file is gone; upload it again.")
        size = path.stat().st_size
        if size == 0:
            raise InputProblem(f"{path.name}: the file is empty (0 bytes).")
        if size > self.limits.max_upload_mb * 1e6:
            raise InputProblem(f"{path.name}: {size / 1e6:.0f} MB; this page takes videos up to "
                               f"{self.limits.max_upload_mb:g} MB (test.py has no limit).")
        if not video.is_video_file(path):
            raise InputProblem(f"{path.name}: not a video file name ({', '.join(video.VIDEO_EXTENSIONS)}).")
        try:
            vinfo = video.probe_video(path)
        except video.VideoError as err:   # its message says what is wrong with the file
            raise InputProblem(f"{path.name}: {one_line(err, path)}.") from None
        except inference.DECODE_ERRORS as err:
            raise InputProblem(f"{path.name}: not a readable video ({one_line(err, path)}).") from None
        if vinfo.num_frames == 0:
            raise InputProblem(f"{path.name}: the video has no frames.")
        if vinfo.duration_sec > self.limits.max_seconds:
            raise InputProblem(f"{path.name}: {vinfo.duration_sec:.0f} s long; this page takes videos up to "
                               f"{self.limits.max_seconds:g} s (test.py --window_sec has no limit).")
        return vinfo

    def settings_for(self, vinfo: video.VideoInfo, threshold, mode, window_sec, stride_sec):
        """``(inference.Settings, note for the page)``: windows when asked or when the video is long."""
        auto = mode != WINDOWS and vinfo.duration_sec > AUTO_WINDOW_SEC
        try:
            if mode == WINDOWS or auto:
                settings = inference.Settings(float(threshold), float(window_sec), float(stride_sec),
                                              annotate=False, batch_size=self.batch_size, workers=0)
            else:
                settings = inference.Settings(float(threshold), annotate=False, batch_size=self.batch_size, workers=0)
        except (UsageError, TypeError, ValueError) as err:
            raise InputProblem(one_line(err).replace("--", "")) from None
        if settings.window_sec is not None and min(settings.window_sec, settings.stride_sec) <= 0:
            raise InputProblem("Window and stride must be above 0 seconds.")
        note = settings.mode
        if auto:
            note = f"longer than {AUTO_WINDOW_SEC:g} s, so cut into {settings.mode}"
        elif settings.window_sec is None:
            note = f"whole clip, {self.info['num_frames']} frames sampled"
        return settings, note

    def _predict(self, path: pathlib.Path, vinfo, settings, note, started, progress) -> Outcome:
        """Predict, annotate and write the CSV into a fresh request folder; a request that fails removes it."""
        out_dir = self._request_dir()
        try:
            return self._predict_into(out_dir, path, vinfo, settings, note, started, progress)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise

    def _predict_into(self, out_dir: pathlib.Path, path: pathlib.Path, vinfo, settings, note, started,
                      progress) -> Outcome:
        total = len(clip_spans(vinfo, settings))   # known before the run, for the progress bar
        progress(0.1, desc=f"decoding and predicting {total} clip(s)")
        done = []

        def on_batch(clips: int) -> None:
            done.append(clips)
            share = min(sum(done) / total, 1.0)
            progress(0.1 + 0.5 * share, desc=f"predicted {sum(done)} of {total} clip(s)")

        results, _, _, _ = inference.run_videos(CountingModel(self.model, on_batch), self.info, [path], [path.name],
                                                [None], settings, self.device, self.dtype)
        result = results[0]
        if result.error:
            raise InputProblem(f"{path.name}: {result.error}")
        progress(0.6, desc=f"annotating {vinfo.num_frames} frames")
        annotated = out_dir / f"{path.stem}_star.mp4"
        try:
            inference.annotate_video(path, annotated, result.tubes, result.info)
        except inference.DECODE_ERRORS as err:
            raise InputProblem(f"{path.name}: cannot be annotated ({one_line(err, path)}).") from None
        progress(0.95, desc="writing the CSV")
        rows = inference.csv_rows(result)
        csv_path = out_dir / "predictions.csv"
        inference.write_predictions(rows, csv_path)
        frames_path = inference.frames_csv_path(csv_path)
        inference.write_frame_predictions(inference.frame_rows(result), frames_path)
        seconds = time.perf_counter() - started
        log.info("%s: %d detection(s) in %.1f s (%s)", path.name, len(result.detections), seconds, note)
        return Outcome(summary_line(result, settings, note, seconds, self.device), True, str(annotated),
                       table_rows(rows, result), result_figure(result, self.info["class_names"], settings),
                       [str(csv_path), str(frames_path)],
                       list(TUBE_TABLE_HEADERS if result.tube_mode else TABLE_HEADERS))

    def _request_dir(self) -> pathlib.Path:
        """A fresh folder for one request; folders older than an hour are removed first."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - RESULT_MAX_AGE_SEC
        for old in self.work_dir.iterdir():
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        return pathlib.Path(tempfile.mkdtemp(prefix="request_", dir=self.work_dir))


class CountingModel:
    """The network, reporting each batch it predicted: run_videos has no per-clip hook, the bar needs one."""

    def __init__(self, net, on_batch: Callable[[int], None]):
        self.net, self.on_batch = net, on_batch

    def __call__(self, clips):
        out = self.net(clips)
        self.on_batch(len(clips))
        return out


# --------------------------------------------------------------------------- what the page shows


def clip_spans(vinfo: video.VideoInfo, settings: inference.Settings) -> list[tuple[float, float]]:
    """The time span of each clip the network will see (``run_videos`` records them as ``VideoResult.spans``)."""
    if settings.window_sec is None:
        return [(0.0, vinfo.duration_sec)]
    frames = video.window_spans(vinfo.num_frames, vinfo.fps, settings.window_sec, settings.stride_sec)
    return [(s / vinfo.fps, e / vinfo.fps) for s, e in frames]


def table_rows(rows: list[dict], result: inference.VideoResult | None = None) -> list[list]:
    """The CSV rows as the page's table (the CSV's own text): class, score, start, end, box (empty for no_object).
    With a tube-mode ``result`` each row starts with its tube's ``tube_id`` (predictions.csv holds one row per tube
    of ``result.tubes``, in that order; empty on the no_object row)."""
    ids = None
    if result is not None and result.tube_mode:
        ids = [str(t.tube_id) for t in result.tubes] if result.detections else [""] * len(rows)
        if len(ids) != len(rows):
            raise ValueError(f"{len(rows)} predictions.csv rows for {len(ids)} tubes")
    table = []
    for i, r in enumerate(rows):
        box = ", ".join(r[k] for k in ("x1", "y1", "x2", "y2")) if r["x1"] else ""
        row = [r["pred_class"], r["score"], r["start_sec"], r["end_sec"], box]
        table.append(row if ids is None else [ids[i], *row])
    return table


def class_scores(queries: list[dict], num_classes: int) -> list[list[float]]:
    """Per class, per clip: the best score of the queries predicting that class (0 when none)."""
    scores = [[0.0] * len(queries) for _ in range(num_classes)]
    for k, pred in enumerate(queries):
        for label, score in zip(pred["labels"].tolist(), pred["scores"].tolist()):
            scores[label][k] = max(scores[label][k], float(score))
    return scores


def result_figure(result: inference.VideoResult, class_names, settings):
    """The page's timeline: one row per tube id for a tube-mode model (:func:`tube_timeline_figure`), else each
    class's best score per clip (:func:`timeline_figure`)."""
    if result.tube_mode:
        info = result.info
        return tube_timeline_figure(result.tubes, info.fps, info.duration_sec, class_names)
    return timeline_figure(result, class_names, settings)


def _rgb(name: str) -> tuple:
    """A class's colour (:func:`video.class_colour`, the annotated video's) as matplotlib takes it."""
    return tuple(v / 255 for v in video.class_colour(name))


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


def timeline_figure(result: inference.VideoResult, class_names, settings):
    """Score over time per class: one segment per clip (``result.spans``) at its best score, the threshold dashed."""
    from matplotlib.figure import Figure   # no pyplot: figures stay private to the request's thread
    fig = Figure(figsize=(8, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    spans = result.spans
    for c, per_clip in enumerate(class_scores(result.queries, len(class_names))):
        colour = tuple(v / 255 for v in video.class_colour(class_names[c]))
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


def summary_line(result: inference.VideoResult, settings, note: str, seconds: float, device) -> str:
    """One line for the page: what was found, how the video was cut, how long it took."""
    dets = result.detections
    if dets:
        per_class = {}
        for d in dets:
            per_class.setdefault(d.class_name, []).append(d)
        parts = [f"{name} x{len(ds)} (best {max(d.score for d in ds):.2f}, {min(d.start_sec for d in ds):.1f}-"
                 f"{max(d.end_sec for d in ds):.1f} s)" for name, ds in per_class.items()]
        found = f"{len(dets)} detection(s) with score >= {settings.score_threshold:g}: {', '.join(parts)}"
    else:
        found = f"No action with score >= {settings.score_threshold:g} (best {result.best_score:.2f})"
    return f"{found}. {note[0].upper() + note[1:]}; {seconds:.1f} s on {device}."


# --------------------------------------------------------------------------- examples


def sample_examples(cache_dir, count: int = SAMPLE_EXAMPLES) -> list[tuple[str, str]]:
    """A few synthetic clips from tools/make_sample_data.py, made once into ``cache_dir``:
    ``(path, label)`` pairs, clips with an action (one per class) first, then one without."""
    root = pathlib.Path(cache_dir) / f"sample_seed{SAMPLE_SEED}"
    if not (root / "action_challenge.csv").is_file():
        _make_samples(root)
    names = (root / "classes.txt").read_text().split()
    actions, negatives, seen = [], [], set()
    with (root / "action_challenge.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            path = str(root / row["video_file"])
            classes = _label_classes(root / row["label_file"], names) if row["label_file"] else []
            if not classes:
                negatives.append((path, "sample: no action"))
            elif classes[0] not in seen:
                seen.add(classes[0])
                actions.append((path, "sample: " + " + ".join(classes)))
    return actions[:count] + negatives[:1]


def _make_samples(root: pathlib.Path) -> None:
    """Write the sample clips to a temporary folder, then move it in place (two servers may start at once)."""
    from tools.make_sample_data import make_sample_dataset
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".samples_", dir=root.parent))
    make_sample_dataset(tmp, num_videos=SAMPLE_VIDEOS, seed=SAMPLE_SEED)
    try:
        tmp.rename(root)
    except OSError:   # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)


def _label_classes(label_file: pathlib.Path, names: list[str]) -> list[str]:
    """The class names a sample label file names (first field of each line), in order."""
    ids = [int(line.split()[0]) for line in label_file.read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(names[i] if i < len(names) else f"action_{i}" for i in ids))


def media_examples(media_dir=MEDIA_DIR) -> list[tuple[str, str]]:
    """Real footage from ``../shared/media`` where present: ``(path, label)`` pairs."""
    folder = pathlib.Path(media_dir)
    if not folder.is_dir():
        return []
    return [(str(p), f"footage: {p.name}") for p in sorted(folder.iterdir()) if p.is_file() and video.is_video_file(p)]


def collect_examples(cache_dir) -> list[tuple[str, str]]:
    """Sample clips plus real footage; an example that cannot be made is left out with a warning."""
    try:
        samples = sample_examples(cache_dir)
    except (OSError, ValueError, video.VideoError) as err:
        log.warning("no sample clips (%s): the page shows real footage only, if any", one_line(err))
        samples = []
    return samples + media_examples()


# --------------------------------------------------------------------------- the page


def theme():
    """Gradio's default look with system fonts, so the page fetches no web fonts."""
    import gradio as gr
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def model_line(app: DemoApp, model_path) -> str:
    """What the page says about the loaded model."""
    if app.model is None:
        return ""
    info = app.info
    name = f" `{pathlib.Path(model_path).name}`" if model_path else ""
    return (f"Model{name}: classes {', '.join(info['class_names'])}; "
            f"{info['num_frames']} frames at {info['img_size']} px; on {app.device}.")


def default_cut(info: dict | None) -> tuple[str, float, float]:
    """``(mode, window, stride)`` the page starts with: as the model was trained (test.py does the same)."""
    window, stride = inference.trained_cut(info or {})
    if window:
        return WINDOWS, window, stride
    return WHOLE, DEFAULT_WINDOW_SEC, DEFAULT_STRIDE_SEC


def cut_info(info: dict | None) -> str:
    """The line under the whole clip / windows choice."""
    if (info or {}).get("window_sec"):
        trained = f"This model was trained on windows of {info['window_sec']:g} s. "
    else:
        trained = f"Whole clip: the network sees {info['num_frames'] if info else 'T'} frames spread over the video. "
    return trained + f"Videos longer than {AUTO_WINDOW_SEC:g} s are cut into windows automatically."


def upload_box(**kwargs):
    """A ``gr.File`` for one video path. Gradio's own (6.x) opens an empty temporary file in its cache on every request
    and never removes it (it only renames the Python object): this box hands the uploaded file's path on as it is,
    after the same file-type check, so a server that runs for weeks does not collect one file per request. Replaced on
    the instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` stub beside this file."""
    import gradio as gr
    box = gr.File(type="filepath", file_count="single", **kwargs)
    box._process_single_file = functools.partial(_uploaded_path, box)
    return box


def _uploaded_path(box, f):
    """What ``gr.File(type="filepath")`` gives for the uploaded file ``f``, without the temporary file."""
    import gradio as gr
    import gradio_client.utils as client_utils
    from gradio.utils import NamedString
    if box.file_types and not client_utils.is_valid_file(f.path, box.file_types):
        raise gr.Error(f"{pathlib.Path(f.path).name}: not a video file name ({', '.join(video.VIDEO_EXTENSIONS)}).")
    return NamedString(f.path)


def build_ui(app: DemoApp, examples: list[tuple[str, str]], model_path=None, concurrency: int = 1):
    """The Gradio page around ``app.predict``; queued, at most ``concurrency`` requests at once."""
    import gradio as gr

    def run(video_path, threshold, mode, window_sec, stride_sec, progress=gr.Progress()):
        outcome = app.predict(video_path, threshold, mode, window_sec, stride_sec, progress)
        if not outcome.ok:
            gr.Warning(outcome.message)
        return outcome.outputs()

    limits = app.limits
    with gr.Blocks(title="STAR action detection", analytics_enabled=False, delete_cache=(1800, 3600)) as page:
        gr.Markdown("## STAR: spatio-temporal action detection\nWhat action happens, where (a box) and when, "
                    "in your video. " + model_line(app, model_path))
        if app.model is None:
            gr.Markdown(app.missing, elem_id="no-model")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                # A file box, not gr.Video: a browser cannot preview .avi/.mkv and gr.Video calls that an error.
                video_in = upload_box(label="Video (.mp4 .avi .mov .mkv)", file_types=list(video.VIDEO_EXTENSIONS),
                                      elem_id="video-in", height=150)
                if examples:
                    gr.Examples([[p] for p, _ in examples], inputs=[video_in], label="Examples (click one)",
                                example_labels=[lab for _, lab in examples])
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold", elem_id="threshold")
                cut, window_sec, stride_sec = default_cut(app.info)
                mode = gr.Radio([WHOLE, WINDOWS], value=cut, label="Cut", elem_id="mode", info=cut_info(app.info))
                with gr.Row():
                    window = gr.Slider(0.1, 30, value=window_sec, step=0.1, label="Window (s)", elem_id="window")
                    stride = gr.Slider(0.1, 30, value=stride_sec, step=0.1, label="Stride (s)", elem_id="stride")
                button = gr.Button("Detect actions", variant="primary", elem_id="run",
                                   interactive=app.model is not None)
                gr.Markdown(f"Limits: {limits.max_upload_mb:g} MB, {limits.max_seconds:g} s per video.")
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Results appear here.", elem_id="status")
                video_out = gr.Video(label="Annotated video", elem_id="video-out", interactive=False, autoplay=True,
                                     loop=True, height=360)
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype="str",
                                     label="Detections", elem_id="detections", interactive=False, max_height=260,
                                     wrap=True)
                plot = gr.Plot(label="Timeline: one row per tube id (tube-mode model), else each class's score per "
                                     "clip", show_label=False, elem_id="timeline", format="png")
                files = gr.File(label="CSV", file_count="multiple", elem_id="csv", interactive=False)
        button.click(run, [video_in, threshold, mode, window, stride], [video_out, table, plot, files, status],
                     concurrency_limit=concurrency, api_name="predict", show_progress_on=[video_out])
    page.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return page


def launch(page, app: DemoApp, host: str, port: int, allowed, block: bool = True):
    """Serve ``page`` offline (no share link, no SSR, no MCP, system fonts); returns Gradio's launch tuple."""
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
                       theme=theme(), css=CSS, max_file_size=app.limits.max_upload_bytes,
                       allowed_paths=[str(p) for p in allowed], show_error=True, prevent_thread_lock=not block,
                       footer_links=[])


# --------------------------------------------------------------------------- command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR web demo (Gradio, offline)", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="STAR checkpoint, the published raw state_dict (with --class_names) or an .onnx file "
                             "(default: demo_output/run/best_model.pth beside app.py, when demo.sh made it)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (0.0.0.0 makes the page reachable from other machines)")
    parser.add_argument("--port", type=number(int, 1), default=7860, help="port to serve on")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--max_upload_mb", type=number(float, 0, strict=True, maximum=MAX_UPLOAD_MB),
                        default=Limits.max_upload_mb, help="largest video the page accepts, in MB (fractions allowed)")
    parser.add_argument("--max_seconds", type=number(float, 0, strict=True), default=Limits.max_seconds,
                        help="longest video the page accepts, in seconds")
    parser.add_argument("--concurrency", type=number(int, 1), default=None,
                        help="requests predicted at once; others wait in the queue (default: 1 on cpu, 2 on cuda)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--examples_dir", default=None,
                        help="where the sample example clips are made once "
                             "(default: $XDG_CACHE_HOME/star/app_examples, else ~/.cache/star/app_examples)")
    return parser


def default_cache_dir() -> pathlib.Path:
    """The user's cache folder for the example clips."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "star" / "app_examples"


def load_app(args, device, dtype, work_dir) -> tuple[DemoApp, pathlib.Path | None]:
    """The DemoApp with the model of ``--model_path`` (or demo.sh's), or without one and the reason."""
    limits = Limits(args.max_upload_mb, args.max_seconds)
    batch = 8 if device.type == "cuda" else 1
    model_path = pathlib.Path(args.model_path) if args.model_path else DEFAULT_MODEL
    if args.model_path is None and not model_path.is_file():
        log.warning("%s", NO_MODEL_LINE)
        return DemoApp(None, None, device, dtype, work_dir, limits, batch_size=batch), None
    net, info, _ = inference.load_model(model_path, device, args.class_names)
    return DemoApp(net, info, device, dtype, work_dir, limits, batch_size=batch), model_path


def serve_until_stopped(page, app: DemoApp, host: str, port: int, allowed) -> str:
    """Serve ``page`` until Ctrl-C or SIGTERM (what ``kill`` and service managers send), then close the server;
    returns which one stopped it. SIGTERM would otherwise end the process at once, and neither atexit nor any
    ``finally`` would remove the request folders."""
    stop = threading.Event()
    reason = []

    def handler(signum, _frame):
        reason.append("interrupted" if signum == signal.SIGINT else "terminated")
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch(page, app, host, port, allowed, block=False)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        page.close()
    return reason[0]


def main(args) -> int:
    """Load the model once, make the examples, serve the page until interrupted or terminated; the request folders
    are removed either way."""
    setup_logging()
    if args.examples_dir:   # the default cache folder may be unwritable: the page then goes without samples
        writable_dir(args.examples_dir, "--examples_dir")
    device = resolve_device(args.device)
    dtype, precision_note = autocast_settings(device, args.precision)
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="star_app_"))
    try:
        app, model_path = load_app(args, device, dtype, work_dir)
        cache_dir = pathlib.Path(args.examples_dir) if args.examples_dir else default_cache_dir()
        examples = collect_examples(cache_dir)
        concurrency = args.concurrency or (2 if device.type == "cuda" else 1)
        log.info("%s; %d example(s); at most %d request(s) at once", precision_note, len(examples), concurrency)
        page = build_ui(app, examples, model_path, concurrency)
        # only what the page shows: the request folders and the example videos, not the rest of their folders
        how = serve_until_stopped(page, app, args.host, args.port, [work_dir, *(path for path, _ in examples)])
        log.info("%s: server closed, request files removed", how)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, get_args_parser().parse_args(argv), errors=(checkpoint.CheckpointError,))


if __name__ == "__main__":
    sys.exit(cli())
