"""The web demo's job (app.py serves it): one uploaded video through the pipeline of test.py.

:class:`DemoApp` holds the loaded model; :meth:`DemoApp.predict` checks the video against the page's
:class:`Limits`, predicts (``inference.run_videos``), annotates, writes the CSVs into a fresh request folder and
answers an :class:`Outcome`: a one-line message always, the annotated video, the table rows, the timeline figure
(timeline.py) and the CSV paths when it worked. Bad input is an Outcome with ``ok=False``, never an exception.
Usable without a server or Gradio.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import inference
import predictions_io
import timeline
import video
from annotated_videos import annotate_video
from clip_loader import DECODE_ERRORS
from cutting import LONG, choose_cut
from detections import VideoResult
from model_description import ModelDescription
from runtime import UsageError, one_line

log = logging.getLogger("star.app")

NO_MODEL_LINE = ("No model loaded: run `bash demo.sh` to train one (demo_output/run/best_model.pth), "
                 "or start the page with `python app.py --model_path best_model.pth`.")
AUTO_WINDOW_SEC = 20.0      # longer videos are cut into windows even in whole-clip mode
DEFAULT_WINDOW_SEC, DEFAULT_STRIDE_SEC = 4.0, 2.0
WHOLE, WINDOWS = "Whole clip", "Windows"
TABLE_HEADERS = ["class", "score", "start (s)", "end (s)", "box x1, y1, x2, y2 (0-1)"]
TUBE_TABLE_HEADERS = ["tube_id", *TABLE_HEADERS]   # tube mode: each row is one tube, its id first
RESULT_MAX_AGE_SEC = 3600   # request folders older than this are removed (Gradio keeps its own copies)


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
        """The values of the page's output components, in ``app.build_ui``'s order."""
        return self.video, self.table(), self.figure, self.files or None, self.message


# --------------------------------------------------------------------------- the prediction function


class DemoApp:
    """The loaded model (or None with the reason) and the per-request prediction function."""

    def __init__(self, model, desc: ModelDescription | None, device, dtype, work_dir, limits: Limits | None = None,
                 missing: str = NO_MODEL_LINE, batch_size: int = 1):
        self.model, self.desc, self.device, self.dtype = model, desc, device, dtype
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
        except DECODE_ERRORS as err:
            raise InputProblem(f"{path.name}: not a readable video ({one_line(err, path)}).") from None
        if vinfo.num_frames == 0:
            raise InputProblem(f"{path.name}: the video has no frames.")
        if vinfo.duration_sec > self.limits.max_seconds:
            raise InputProblem(f"{path.name}: {vinfo.duration_sec:.0f} s long; this page takes videos up to "
                               f"{self.limits.max_seconds:g} s (test.py --window_sec has no limit).")
        return vinfo

    def settings_for(self, vinfo: video.VideoInfo, threshold, mode, window_sec, stride_sec):
        """``(inference.Settings, note for the page)``: windows when asked or when the video is long
        (:func:`cutting.choose_cut`)."""
        try:
            threshold = float(threshold)
            cut = choose_cut(self.desc, window_sec, stride_sec, whole=mode != WINDOWS, duration_sec=vinfo.duration_sec,
                             longest_whole_sec=AUTO_WINDOW_SEC)
            settings = inference.Settings(threshold, cut.window_sec, cut.stride_sec, annotate=False,
                                          batch_size=self.batch_size, workers=0)
        except (UsageError, TypeError, ValueError) as err:
            raise InputProblem(one_line(err).replace("--", "")) from None
        if settings.window_sec is not None and min(settings.window_sec, settings.stride_sec) <= 0:
            raise InputProblem("Window and stride must be above 0 seconds.")
        note = settings.mode
        if cut.why == LONG:
            note = f"longer than {AUTO_WINDOW_SEC:g} s, so cut into {settings.mode}"
        elif settings.window_sec is None:
            note = f"whole clip, {self.desc.num_frames} frames sampled"
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

        results, _, _, _ = inference.run_videos(CountingModel(self.model, on_batch), self.desc, [path], [path.name],
                                                [None], settings, self.device, self.dtype)
        result = results[0]
        if result.error:
            raise InputProblem(f"{path.name}: {result.error}")
        progress(0.6, desc=f"annotating {vinfo.num_frames} frames")
        annotated = out_dir / f"{path.stem}_star.mp4"
        try:
            annotate_video(path, annotated, result.tubes, result.info)
        except DECODE_ERRORS as err:
            raise InputProblem(f"{path.name}: cannot be annotated ({one_line(err, path)}).") from None
        progress(0.95, desc="writing the CSV")
        rows = predictions_io.csv_rows(result)
        csv_path = out_dir / "predictions.csv"
        predictions_io.write_predictions(rows, csv_path)
        frames_path = predictions_io.frames_csv_path(csv_path)
        predictions_io.write_frame_predictions(predictions_io.frame_rows(result), frames_path)
        seconds = time.perf_counter() - started
        log.info("%s: %d detection(s) in %.1f s (%s)", path.name, len(result.detections), seconds, note)
        return Outcome(summary_line(result, settings, note, seconds, self.device), True, str(annotated),
                       table_rows(rows, result), timeline.result_figure(result, self.desc.class_names, settings),
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


def table_rows(rows: list[dict], result: VideoResult | None = None) -> list[list]:
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


def summary_line(result: VideoResult, settings, note: str, seconds: float, device) -> str:
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
