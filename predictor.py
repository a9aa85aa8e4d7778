"""The network's side of a stream: the main loop leaves the newest clip in a one-slot :class:`Mailbox`, and the
:class:`Predictor` thread runs the network on it (in tube mode it also cuts the clip's tubes) and hands each
:class:`Prediction` on."""
from __future__ import annotations

import dataclasses
import datetime
import threading
import time

import numpy as np

import inference
import tubes
import video
from capture import ClipJob
from detections import detections_from_prediction
from model_description import ModelDescription
from runtime import one_line

# What a prediction may raise: a failed kernel or out of memory (RuntimeError), a clip an ONNX model refuses
# (ValueError), and an events file that cannot be written (OSError).
PREDICT_ERRORS = (RuntimeError, ValueError, OSError, MemoryError)


class Mailbox:
    """One slot between the main loop and the predictor: ``put`` replaces a waiting item, ``take`` waits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item, self._closed = None, False

    def put(self, item) -> bool:
        """Leave ``item``; True when it replaced one the predictor never took (skipped work)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self):
        """The waiting item (waits for one); None once closed and empty."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            return item

    def close(self, drop: bool) -> bool:
        """No more items; ``drop`` discards a waiting one (returns True when it did)."""
        with self._cond:
            dropped = drop and self._item is not None
            if drop:
                self._item = None
            self._closed = True
            self._cond.notify_all()
            return dropped


@dataclasses.dataclass
class Prediction:
    """The network's answer for one clip."""

    job: ClipJob
    detections: list            # [detections.Detection], best first
    best_score: float
    latency: float
    wall_time: str
    clip_tubes: list | None = None   # tube mode: the clip's tubes (tubes.clip_tubes), stream frames


class Predictor(threading.Thread):
    """Takes the newest clip from the mailbox, runs the network, hands the :class:`Prediction` on."""

    def __init__(self, model, desc: ModelDescription, device, dtype, threshold: float, mailbox: Mailbox, on_result):
        super().__init__(name="stream-predictor", daemon=True)
        self.model, self.desc, self.device, self.dtype = model, desc, device, dtype
        self.threshold, self.mailbox, self.on_result = threshold, mailbox, on_result
        self.error: str | None = None
        self.failed = threading.Event()
        self.tube_mode = False   # known after warm_up: the network predicts per-step boxes

    def warm_up(self) -> float:
        """One prediction on a blank clip (kernel selection, allocations), so the first real clip is not late."""
        t0 = time.perf_counter()
        s = self.desc.img_size
        h, w = (s, s) if np.isscalar(s) else tuple(s)
        t = self.desc.num_frames
        pred = self.predict(ClipJob(np.zeros((t, h, w, 3), np.uint8), 0.0, 0.0, 0.0, time.monotonic(), (0, t),
                                    np.arange(t)))
        self.tube_mode = pred.clip_tubes is not None
        return time.perf_counter() - t0

    def predict(self, job: ClipJob) -> Prediction:
        clip = video.preprocess(job.frames, self.desc.img_size, self.desc.mean, self.desc.std)
        pred = inference.predict_clips(self.model, clip[None], self.device, self.dtype)[0]
        clip_tubes = None
        if "step_scores" in pred:   # tube mode: a clip's queries on one actor are one detection, as in test.py
            pred = tubes.merge_duplicate_queries(pred, self.threshold)
            clip_tubes = tubes.clip_tubes(pred, job.frame_indices, job.span, self.threshold, self.desc.class_names)
        dets = detections_from_prediction(pred, self.desc.class_names, self.threshold, job.start_sec, job.end_sec)
        best = float(pred["scores"].max()) if pred["scores"].numel() else 0.0
        latency = time.monotonic() - job.arrival
        wall = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
        return Prediction(job, dets, best, latency, wall, clip_tubes)

    def run(self) -> None:
        while (job := self.mailbox.take()) is not None:
            try:
                self.on_result(self.predict(job))
            except PREDICT_ERRORS as err:
                self.error = f"prediction failed: {one_line(err)}"
                self.failed.set()
                return
