"""STAR's prediction pipeline, shared by test.py (a folder of videos), stream.py and app.py.

Pipeline: the model is loaded once (:func:`load_model`: the network and its :class:`ModelDescription`); decoding and
preprocessing run in background processes (a ``DataLoader`` over a ``clip_loader.ClipStream``) while the network runs
batches under ``torch.inference_mode`` (fp16 autocast on CUDA, bf16 on CPUs with native bf16); annotated videos are
written by a background thread (``annotated_videos.Annotator``) in a second sequential pass over each input once its
predictions are known, so no whole video is ever held in memory. A video that cannot be read is an item with an error,
never an exception.

A query is a detection when its best foreground probability (softmax over all C+1 logits) is at least the score
threshold (the published rule). Without windows each video is one clip of T uniformly sampled frames (the published
behaviour); with ``window_sec`` windows every ``stride_sec`` (``cutting.choose_cut``) are predicted separately and
joined (``detections.finish_video``): detections of one class with overlapping boxes in overlapping or consecutive
windows into one time span, a tube-mode checkpoint's per-frame boxes into tubes. The rows are written by
``predictions_io.py``; ``test.py --labels`` scores them with ``scoring.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import torch
from tqdm import tqdm

import backend
import postprocess
import tubes
import video
from annotated_videos import Annotator
from clip_loader import ClipStream, make_loader
from cutting import choose_cut
from detections import VideoResult, detections_from_prediction, finish_video
from model_description import ModelDescription
from runtime import UsageError, autocast, one_line

log = logging.getLogger("star.inference")

PROGRESS_LOG_SEC = 60.0           # a progress line (done, failed, ETA) goes to the log this often


def release_free_memory() -> None:
    """Give memory freed by the C allocator back to the system (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclasses.dataclass
class Settings:
    """How videos are cut (``cutting.choose_cut``'s :class:`cutting.Cut`) and predicted: the knobs test.py and app.py
    share."""

    score_threshold: float = 0.5
    window_sec: float | None = None     # None: the whole video is one clip (the published behaviour)
    stride_sec: float | None = None     # None: = window_sec
    annotate: bool = True
    batch_size: int = 1
    workers: int = 1
    folder_fps: float = video.DEFAULT_FOLDER_FPS   # frame rate of folders of numbered frames

    def __post_init__(self):
        cut = choose_cut(None, self.window_sec, self.stride_sec)   # a stride needs a window; by default back to back
        self.window_sec, self.stride_sec = cut.window_sec, cut.stride_sec
        if not 0.0 <= self.score_threshold <= 1.0:
            raise UsageError(f"--score_threshold must be in [0, 1], got {self.score_threshold}")

    @property
    def mode(self) -> str:
        if self.window_sec:
            return f"windows of {self.window_sec:g} s every {self.stride_sec:g} s"
        return "whole video = one clip"


def predict_clips(model, clips: torch.Tensor, device, dtype=None) -> list[dict]:
    """The network on preprocessed clips ``(B, T, 3, S, S)``: per clip ``{"scores": (Q,), "labels": (Q,),
    "boxes": (Q, 4) normalised xyxy}`` (:func:`postprocess.outputs_to_predictions`), plus ``"step_scores" (Q, T)`` and
    ``"step_boxes" (Q, T, 4)`` from a tube-mode network."""
    with torch.inference_mode(), autocast(device, dtype):
        return postprocess.outputs_to_predictions(model(clips.to(device, non_blocking=True)))


def predict(model, loader, results: list[VideoResult], class_names, threshold: float, device, dtype,
            on_video_done) -> int:
    """Run the network over the clip stream; fills ``results``; returns the number of clips."""
    clips_done = 0
    local = {r.index: r for r in results}
    for batch in loader:
        preds = []
        if batch.clips is not None:
            preds = predict_clips(model, batch.clips, device, dtype)
            clips_done += len(preds)
        pred_iter = iter(preds)
        for item in batch.items:
            res = local[item.index]
            res.info = item.info or res.info
            if item.error:
                res.error = item.error
            elif item.has_clip:
                pred = next(pred_iter)
                res.clips += 1
                res.queries.append(pred)
                res.spans.append((item.start_sec, item.end_sec))
                res.frame_indices.append(item.frame_indices)
                res.frame_spans.append(item.frame_span)
                res.best_score = max(res.best_score, float(pred["scores"].max()) if pred["scores"].numel() else 0.0)
                if "step_scores" in pred:   # tube mode: detections come from the joined tubes (finish_video)
                    res.tube_mode = True
                    res.clip_tubes.append(tubes.clip_tubes(tubes.merge_duplicate_queries(pred, threshold),
                                                           item.frame_indices, item.frame_span, threshold, class_names))
                else:
                    res.detections += detections_from_prediction(pred, class_names, threshold,
                                                                 item.start_sec, item.end_sec)
            if item.done:
                on_video_done(res)
    return clips_done


def load_model(model_path, device, class_names=None) -> tuple[object, ModelDescription]:
    """Load the model once (:func:`backend.load_model`: a PyTorch checkpoint prepared for inference, or an ONNX
    export run by onnxruntime), describe it and free the loaded dict. Returns ``(model, description)``."""
    t0 = time.perf_counter()
    net, info = backend.load_model(model_path, device=device, class_names=class_names)
    desc = ModelDescription.from_info(info)
    del info   # the loaded checkpoint dict (optimizer...)
    release_free_memory()
    log.info("model %s (%s, classes %s, %d frames x %s px) loaded in %.1f s on %s",
             model_path, desc.source, ", ".join(desc.class_names), desc.num_frames, desc.img_size,
             time.perf_counter() - t0, device)
    return net, desc


class ProgressLog:
    """A line for the log file every ``PROGRESS_LOG_SEC`` (the bar goes to the console only): videos done of all,
    failed, seconds per video and the time left, for runs of hours over thousands of videos."""

    def __init__(self, bar, enabled: bool):
        self.bar, self.enabled = bar, enabled
        self.failed, self.last = 0, time.monotonic()

    def video_done(self, failed: bool) -> None:
        self.failed += failed
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)
        if self.enabled and time.monotonic() - self.last >= PROGRESS_LOG_SEC:
            self.last = time.monotonic()
            log.info("progress: %s", self.line())

    def line(self) -> str:
        done, total, elapsed = self.bar.n, self.bar.total, self.bar.format_dict["elapsed"]
        per_video = elapsed / max(done, 1)
        return (f"{done}/{total} videos ({self.failed} failed), {per_video:.2f} s/video, "
                f"about {tqdm.format_interval(per_video * (total - done))} left")


def run_videos(model, desc: ModelDescription, paths, names, targets, settings: Settings, device, dtype, rank: int = 0,
               on_complete=None):
    """Predict (and annotate, to ``targets``) videos. Returns ``(results, clips, annotated, annotation failures)``.
    ``on_complete(result)`` is called once a video's outputs are all written (its annotated video renamed into
    place): test.py then records it as complete."""
    stream = ClipStream(paths, desc.num_frames, desc.img_size, desc.mean, desc.std, settings.window_sec,
                        settings.stride_sec, settings.folder_fps)
    results = [VideoResult(k, name, os.fspath(p)) for k, (name, p) in enumerate(zip(names, paths))]
    on_complete = on_complete or (lambda _res: None)
    annotator = Annotator(settings.annotate, {os.fspath(p): t for p, t in zip(paths, targets)}, on_complete)
    bar = tqdm(total=len(paths), desc="videos", unit="video", disable=rank != 0, dynamic_ncols=True)
    progress, finished = ProgressLog(bar, rank == 0), set()

    def on_video_done(res: VideoResult) -> None:
        finished.add(res.index)
        progress.video_done(bool(res.error))
        if res.error:
            log.warning("FAILED %s: %s", res.name, res.error)
            res.queries = []
            return
        finish_video(res, settings)
        if settings.annotate:
            annotator.submit(res)
        else:
            on_complete(res)

    loader = make_loader(stream, settings.batch_size, settings.workers, pin_memory=device.type == "cuda")
    stopped = None
    try:
        clips = predict(model, loader, results, desc.class_names, settings.score_threshold, device, dtype,
                        on_video_done)
    except RuntimeError as err:   # a decoding worker died (a crash inside FFmpeg), or the network cannot run
        stopped = one_line(err)
        log.error("inference stopped: %s", stopped)
        clips = sum(r.clips for r in results)
    finally:
        bar.close()
    annotated, failures = annotator.wait()
    for res in results:
        if res.index not in finished:
            res.error, res.queries = f"not processed: inference stopped ({stopped})", []
    return results, clips, annotated, failures
