#!/usr/bin/env python
"""STAR on a live source: a camera, a network stream, or a video file played as a camera delivers it.

    python stream.py --source rtsp://camera/stream --model_path best_model.pth \
        --events events.csv --output annotated.mp4 [--stride 8] [--reconnect]
    python stream.py --source rtsp://camera/stream --model_path tube_model.pth \
        --tube_events tubes.csv [--webhook http://host/hook] --output annotated.mp4

``--source`` is a camera index (``0`` = ``/dev/video0`` through v4l2 on Linux, avfoundation on macOS),
a URL (``rtsp://``, ``http(s)://``, ``udp://``, ``tcp://``, ...; FFmpeg opens it, with a timeout) or a
video file, played at its own frame rate (times ``--speed``).

Three threads, every buffer between them bounded, so memory stays flat however long the stream:

- reader: decodes the source, stamps each frame's arrival and hands it to a queue of about one
  second of frames; when that queue is full the oldest frame is dropped and counted (a live source
  cannot wait). A file's reader sleeps to the frame clock.
- main loop: resizes each frame to the model's input into a ring buffer holding one clip window,
  draws the latest detections into ``--output`` / ``--show``, and every ``--stride`` frames hands the
  newest clip to the predictor through a one-slot mailbox. A clip still waiting there is replaced
  and counted as skipped, so the network always runs on the newest clip and nothing queues up
  (unlike demos that queue every clip and fall minutes behind).
- predictor: runs the network, appends the detections to ``--events`` (flushed every row) and
  publishes them for drawing.

With a tube-mode checkpoint the predictor also joins each clip's actors into tubes (``tube_events.LiveTubes``:
test.py's joining rules, one clip at a time): ``--tube_events`` gets a ``start`` row per tube once it spans
``--tube_start_sec`` and an ``end`` row once its actor stopped, left or changed action; ``--webhook`` gets the same
rows as JSON (``webhook.WebhookSender``: its own thread, never in the way of frames); ``--output`` draws each tube's
box and ``#id`` at every frame once the predictions cover it (frames wait in a bounded buffer).

A live clip is the last W frames, W = ``--clip_sec`` x the source's frame rate (default: the training
window a checkpoint stores, else T frames at the source rate, T = the model's frame count); T frames
are sampled uniformly over them with the offline rule (``video.sample_indices``), the newest always
included. Latency = wall time from the arrival of a clip's last frame to its result.

Exit codes: 0 at the stream's end (or ``--max_seconds``), 1 when the stream stalled or broke and was
not recovered, 2 (one line) for a bad source, model or output, 130 on Ctrl-C, 143 on SIGTERM; every
output file is closed first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import queue
import signal
import sys
import threading
import time

import torch

import checkpoint
import inference
import tube_events
import video
import webhook
from capture import Frame, FrameReader, FrameRing, window_frames
from cutting import choose_cut
from detections import tube_linker
from files import write_text
from model_description import ModelDescription
from predictor import PREDICT_ERRORS, Mailbox, Prediction, Predictor
from runtime import (UsageError, autocast_settings, number, one_line, resolve_device, run_cli, setup_logging,
                     writable_dir)
from sources import SourceError, SourceSpec, open_source, parse_options, parse_source
from stream_outputs import AnnotatedWriter, Display, EventsWriter, StatusLine, TubeVideoWriter, drawn
from stream_state import TUBE_START_SEC, StopFlag, StreamSettings, StreamStats

log = logging.getLogger("star.stream")

EXIT_CODES = {"ended": 0, "max_seconds": 0, "stalled": 1, "broken": 1, "failed": 1, "interrupted": 130,
              "terminated": 143}
FRAME_QUEUE_SEC = 1.0     # frames the reader may run ahead of the main loop before dropping the oldest


# --------------------------------------------------------------------------- the run


class StreamRun:
    """One run: opens the source, starts the reader and the predictor, and drives the main loop.
    ``run()`` returns the :class:`StreamStats`; every output is closed and every thread joined first."""

    def __init__(self, spec: SourceSpec, model, desc: ModelDescription, settings: StreamSettings, device, dtype,
                 stop: StopFlag | None = None, on_prediction=None):
        self.spec, self.desc, self.settings = spec, desc, settings
        self.stop = stop or StopFlag()
        self.on_prediction = on_prediction
        self.stats = StreamStats()
        self.halt = threading.Event()
        self.mailbox = Mailbox()
        self.predictor = Predictor(model, desc, device, dtype, settings.score_threshold, self.mailbox, self._result)
        self.first_arrival = 0.0
        self.latest: list = []      # the newest prediction's detections, drawn on every frame until the next
        self.events = self.writer = self.reader = self.ring = None
        self.live: tube_events.LiveTubes | None = None    # tube mode: tubes and their events
        self.tube_file: tube_events.EventFile | None = None
        self.webhook: webhook.WebhookSender | None = None
        self.display = Display(settings.show)

    def _result(self, pred: Prediction) -> None:
        """In the predictor thread: write the events, link the clip's tubes, publish the detections."""
        if self.events is not None:
            self.stats.events_rows += self.events.write(pred)
        if self.live is not None and pred.clip_tubes is not None:
            self._say(self.live.update(pred.clip_tubes, pred.job.span, pred.job.arrival))
        self.latest = pred.detections   # one reference assignment: the main loop reads whole lists
        self.stats.latencies.append(pred.latency)
        self.stats.predictions += 1
        if self.on_prediction is not None:
            self.on_prediction(pred)

    def _say(self, events: list) -> None:
        """Tube events to the log, ``--tube_events`` and ``--webhook``."""
        for event in events:   # the file first: whatever the log says is on disk
            if self.tube_file is not None:
                self.tube_file.write(event)
            if self.webhook is not None:
                self.webhook.send(event.as_dict())
            self.stats.tube_events += 1
            log.info("tube #%d %s %s at %.2f s (score %.2f)", event.tube_id, event.pred_class,
                     "started" if event.event == "start" else "ended",
                     event.action_start_sec if event.event == "start" else event.action_end_sec, event.score)

    def run(self) -> StreamStats:
        self._warm_up()
        if (self.settings.tube_events or self.settings.webhook) and not self.predictor.tube_mode:
            raise UsageError("--tube_events and --webhook need a tube-mode checkpoint (one trained on per-frame "
                             "labels); this one predicts one box per clip: use --events")
        started = time.monotonic()   # the run's seconds count streaming, not loading
        try:
            source = open_source(self.spec, self.settings.stall_sec)
            self._start(source)
            self._loop(time.monotonic())
        finally:
            self._finish()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _warm_up(self) -> None:
        """One blank prediction before the source opens: a model that cannot run fails here (exit code 2)."""
        try:
            log.info("warm-up prediction: %.2f s", self.predictor.warm_up())
        except PREDICT_ERRORS as err:
            raise checkpoint.CheckpointError(f"the model cannot predict a {self.desc.num_frames}-frame clip of "
                                             f"{self.desc.img_size} px: {one_line(err)}") from None

    def _start(self, source) -> None:
        s, desc = self.settings, self.desc
        try:
            if self.predictor.tube_mode:
                self._start_tubes(source.fps)
            if s.events:
                self.events = EventsWriter(s.events)
            if s.output and self.live is not None:
                self.writer = TubeVideoWriter(_output_path(s.output), source.fps, self.live, self.live.start_frames)
            elif s.output:
                self.writer = AnnotatedWriter(_output_path(s.output), source.fps)
        except UsageError:
            source.close()
            raise
        if s.speed != 1.0 and source.live:
            log.warning("--speed applies to a file source only; a live source plays at its own rate")
        fps = source.fps * (1.0 if source.live else s.speed)
        self.ring = FrameRing(window_frames(desc.num_frames, source.fps, s.clip_sec), desc.img_size)
        self.stats.window_frames = self.ring.size
        self.frame_sec = 1.0 / source.fps
        log.info("source %s: %s, %dx%d at %.2f fps%s; live clip: the last %d frames (%.2f s), %d sampled uniformly, "
                 "predicted every %d frames", self.spec.target, self.spec.kind, source.width, source.height,
                 source.fps, f" played at {s.speed:g}x" if not source.live and s.speed != 1 else "", self.ring.size,
                 self.ring.size / source.fps, desc.num_frames, s.stride)
        frames = queue.Queue(maxsize=max(8, int(round(fps * FRAME_QUEUE_SEC))))
        self.frames = frames
        self.reader = FrameReader(self.spec, source, frames, self.halt, s, self.stats)
        self.predictor.start()
        self.reader.start()

    def _start_tubes(self, fps: float) -> None:
        """Tube mode: link tubes with test.py's rules at the source's rate; open --tube_events and --webhook."""
        linker = tube_linker(fps)
        start = video.seconds_to_frames(self.settings.tube_start_sec, fps)
        self.live = tube_events.LiveTubes(linker, tube_events.FrameClock(fps), start, self.settings.stride)
        if self.settings.tube_events:
            self.tube_file = tube_events.EventFile(self.settings.tube_events)
        if self.settings.webhook:
            self.webhook = webhook.WebhookSender(self.settings.webhook)

    def _loop(self, started: float) -> None:
        status = StatusLine(self.stats)
        try:
            while not self._should_stop(started):
                try:
                    item = self.frames.get(timeout=0.1)
                except queue.Empty:
                    status.update()
                    continue
                if item is None:
                    end, message = self.reader.outcome
                    self.stop.set(end)
                    self.stats.message = message
                    break
                self.stats.max_queued_frames = max(self.stats.max_queued_frames, self.frames.qsize() + 1)
                self._on_frame(item)
                status.update()
        finally:
            status.update(force=True)
            status.close()

    def _should_stop(self, started: float) -> bool:
        """A stop asked for, the predictor failed, --max_seconds reached, or the reader stuck (watchdog)."""
        s = self.settings
        if self.predictor.failed.is_set():
            self.stop.set("failed")
            self.stats.message = self.predictor.error
        elif s.max_seconds is not None and time.monotonic() - started >= s.max_seconds:
            self.stop.set("max_seconds")
        elif self.spec.live and time.monotonic() - self.reader.last_activity > 2 * s.stall_sec + 5:
            # The reader's own read timeout should have fired; a driver that ignores it must not hang the run.
            self.stop.set("stalled")
            self.stats.message = f"stalled: the source gave nothing for {2 * s.stall_sec + 5:.0f} s"
        return self.stop.is_set()

    def _on_frame(self, frame: Frame) -> None:
        s = self.stats
        s.frames += 1
        s.stream_sec = frame.time_sec
        if s.frames == 1:
            self.first_arrival = frame.arrival
        s.input_sec = frame.arrival - self.first_arrival
        self.ring.push(frame)
        index = self.ring.count - 1
        if self.live is not None:
            self.live.clock.add(index, frame.time_sec)
        if self.ring.full and (self.ring.count - self.ring.size) % self.settings.stride == 0:
            s.clips += 1
            s.skipped += self.mailbox.put(self.ring.clip(self.desc.num_frames, self.frame_sec))
        detections = self.latest
        if self.writer is not None:
            try:
                self.writer.write(frame.image, index if self.live is not None else detections)
            except (video.VideoError, OSError) as err:
                self.stop.set("failed")
                self.stats.message = f"--output {self.settings.output}: {one_line(err)}"
        if not self.display.enabled:
            return
        # the window shows the newest prediction's detections, or each open tube's newest predicted box
        shown = drawn(detections) if self.live is None else [tube[:3] for tube in self.live.latest_boxes()]
        if not self.display.show(frame.image, shown):
            self.stop.set("ended")
            self.stats.message = "closed in the window (q)"

    def _finish(self) -> None:
        """Stop the reader, let the predictor finish (the last clip too at a normal end), close every output,
        join the threads."""
        self.halt.set()
        normal = self.stop.reason in (None, "ended", "max_seconds")
        self.stats.skipped += self.mailbox.close(drop=not normal)
        if self.predictor.is_alive():
            self.predictor.join()
        if self.predictor.error and self.stop.reason != "failed":
            self.stats.message = self.predictor.error
        self.stats.end = self.stop.reason or "ended"
        if self.live is not None and self.ring is not None:
            self._say(self.live.finish(max(self.ring.count - 1, 0), time.monotonic()))
        if self.webhook is not None:
            self.webhook.close()
            log.info("%s", self.webhook.summary())
        for output in (self.events, self.tube_file, self.writer, self.display):
            if output is not None:
                output.close()
        if self.reader is not None:
            self.reader.join(timeout=self.settings.stall_sec + 5)
            if self.reader.is_alive():
                log.warning("the source reader did not stop within %.0f s (stuck in the driver); leaving it",
                            self.settings.stall_sec + 5)


def _output_path(path) -> pathlib.Path:
    """``--output``'s path with its folder made and checked writable; UsageError when it is not."""
    path = pathlib.Path(path)
    writable_dir(path.parent, "--output")
    return path


def check_output_folders(args) -> None:
    """Every output's folder (``--output``, ``--events``, ``--stats_json``) made and writable, before the model is
    loaded: an unwritable folder is one line naming it, not a failure after the stream ran."""
    for flag in ("output", "events", "tube_events", "stats_json"):
        path = getattr(args, flag)
        if path and path != "-":
            writable_dir(pathlib.Path(path).parent, f"--{flag}")


def run_stream(spec: SourceSpec, model, desc: ModelDescription, settings: StreamSettings, device, dtype=None,
               stop: StopFlag | None = None, on_prediction=None) -> StreamStats:
    """Stream ``spec`` through the model with ``settings``; returns the stats once everything is closed.
    Raises SourceError when the source cannot be opened at all, UsageError for an unwritable output."""
    return StreamRun(spec, model, desc, settings, device, dtype, stop, on_prediction).run()


# --------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR on a live source: a camera, a network stream or a video "
                                     "file played in real time", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="camera index (0 = /dev/video0), URL (rtsp:// http(s):// udp:// tcp:// ...) or video file")
    parser.add_argument("--model_path", default="best_model.pth", help="STAR checkpoint (.pth) or ONNX export (.onnx)")
    parser.add_argument("--output", default=None, help="annotated H.264 MP4: every frame, the latest detections drawn")
    parser.add_argument("--events", default=None,
                        help="events CSV: one row per detection per prediction (no_object rows too), flushed every row")
    parser.add_argument("--tube_events", default=None,
                        help="tube-mode checkpoint: CSV with one row when a tube's action starts and one when it ends "
                             "(flushed every row); '-' writes JSON lines to stdout")
    parser.add_argument("--tube_start_sec", type=number(float, 0, strict=True), default=TUBE_START_SEC,
                        help="a tube's start is said once it spans this long: shorter answers sooner, longer says "
                             "fewer false starts")
    parser.add_argument("--webhook", default=None, metavar="URL",
                        help="tube-mode checkpoint: POST each tube event as JSON to this http(s) URL (own thread, "
                             "bounded queue, retries; a slow receiver never delays the stream)")
    parser.add_argument("--stride", type=number(int, 1), default=8, help="predict the newest clip every N frames")
    parser.add_argument("--clip_sec", type=number(float, 0, strict=True), default=None,
                        help="seconds a live clip spans, its T frames sampled uniformly over them (default: the "
                             "checkpoint's training window if stored, else T consecutive frames)")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="a query is a detection when its best foreground probability is at least this")
    parser.add_argument("--show", action="store_true", help="show the annotated stream in a window (q quits)")
    parser.add_argument("--reconnect", action="store_true",
                        help="reopen a camera or URL that stalls, breaks or ends, with back-off (never a file)")
    parser.add_argument("--reconnect_tries", type=number(int, 1), default=5,
                        help="reconnection attempts in a row before giving up (back-off 1, 2, 4 ... 30 s)")
    parser.add_argument("--stall_sec", type=number(float, 0, strict=True), default=10.0,
                        help="a source that gives no frame for this long has stalled (also FFmpeg's open timeout)")
    parser.add_argument("--max_seconds", type=number(float, 0, strict=True), default=None,
                        help="stop after this many seconds of wall time (exit code 0)")
    parser.add_argument("--speed", type=number(float, 0, strict=True), default=1.0,
                        help="file source: play at this multiple of its frame rate")
    parser.add_argument("--source_option", action="append", default=None, metavar="KEY=VALUE",
                        help="an FFmpeg option for opening the source (repeatable), e.g. rtsp_transport=udp")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--num_frames", type=number(int, 1), default=None,
                        help="frames per clip T (default: the checkpoint's; a raw state_dict assumes 16)")
    parser.add_argument("--img_size", type=number(int, 16), default=None,
                        help="input size S (default: the checkpoint's; a raw state_dict assumes 224)")
    parser.add_argument("--threads", type=number(int, 1), default=None,
                        help="torch CPU threads for the network (default: torch's choice)")
    parser.add_argument("--stats_json", default=None,
                        help="write the run's figures (counts, latencies) as JSON here at the end")
    return parser


def settings_from_args(args) -> StreamSettings:
    return StreamSettings(stride=args.stride, clip_sec=args.clip_sec, score_threshold=args.score_threshold,
                          events=args.events, tube_events=args.tube_events, tube_start_sec=args.tube_start_sec,
                          webhook=args.webhook, output=args.output,
                          show=args.show, reconnect=args.reconnect, reconnect_tries=args.reconnect_tries,
                          stall_sec=args.stall_sec, max_seconds=args.max_seconds, speed=args.speed)


def model_info(desc: ModelDescription, num_frames=None, img_size=None, clip_sec=None
               ) -> tuple[ModelDescription, float | None]:
    """``desc`` with the --num_frames/--img_size overrides, and the clip length (:func:`cutting.choose_cut`'s window):
    --clip_sec, else the training window the checkpoint stores, else None (T frames)."""
    return desc.with_clip(num_frames, img_size), choose_cut(desc, clip_sec).window_sec


@contextlib.contextmanager
def signals_stop(stop: StopFlag):
    """Ctrl-C and SIGTERM ask the run to stop (outputs closed, threads joined) instead of killing it."""
    def handler(signum, _frame):
        stop.set("interrupted" if signum == signal.SIGINT else "terminated")
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def summary(stats: StreamStats, settings: StreamSettings) -> None:
    lines = ["summary:",
             f"  end         : {stats.end}" + (f" ({stats.message})" if stats.message else ""),
             f"  frames      : {stats.frames} in {stats.seconds:.1f} s ({stats.dropped_frames} dropped, "
             f"stream time {stats.stream_sec:.1f} s, {stats.reconnects} reconnection(s))",
             f"  predictions : {stats.predictions} of {stats.clips} clips ({stats.skipped} skipped for newer ones); "
             f"latency median {stats.latency(0.5):.3f} s, p95 {stats.latency(0.95):.3f} s"]
    if settings.events:
        lines.append(f"  events      : {settings.events} ({stats.events_rows} rows)")
    if settings.tube_events:
        lines.append(f"  tube events : {settings.tube_events} ({stats.tube_events} rows)")
    if settings.output:
        lines.append(f"  annotated   : {settings.output}")
    log.info("\n".join(lines))


def main(args) -> int:
    setup_logging(to_stderr=args.tube_events == "-")
    check_output_folders(args)
    spec = parse_source(args.source, parse_options(args.source_option))
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype, note = autocast_settings(device, args.precision)
    net, desc = inference.load_model(args.model_path, device, args.class_names)
    desc, settings.clip_sec = model_info(desc, args.num_frames, args.img_size, args.clip_sec)
    log.info("%s on %s, %d torch thread(s); %d frames x %s px per clip", note, device, torch.get_num_threads(),
             desc.num_frames, desc.img_size)
    stop = StopFlag()
    with signals_stop(stop):
        stats = run_stream(spec, net, desc, settings, device, dtype, stop)
    summary(stats, settings)
    if args.stats_json:
        write_text(args.stats_json, json.dumps(stats.as_dict(), indent=1) + "\n")
    if EXIT_CODES[stats.end] == 1:
        log.error("error: stream %s", stats.message or stats.end)
    return EXIT_CODES[stats.end]


def cli(argv=None) -> int:
    return run_cli(main, get_args_parser().parse_args(argv), errors=(SourceError, checkpoint.CheckpointError))


if __name__ == "__main__":
    sys.exit(cli())
