"""Annotated videos: every frame of an input at its size and rate with each tube's box of that frame drawn
(:func:`annotate_video`, written under a hidden name and renamed when complete), and :class:`Annotator`, which writes
them in a background thread while the network goes on with the next videos.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pathlib
from typing import Sequence

import drawing
import tubes
import video
import video_writer
from clip_loader import DECODE_ERRORS
from detections import VideoResult
from runtime import one_line

log = logging.getLogger("star.inference")

PARTIAL_SUFFIX = ".partial.mp4"   # an annotated video being written (hidden, renamed when complete)


def annotate_video(src, dst, video_tubes: Sequence[tubes.PredTube], info: video.VideoInfo) -> int:
    """Write ``dst`` (H.264 MP4): every frame of ``src`` at its size and rate, each tube's box of that frame drawn
    with its class, score at that frame and ``#tube_id`` (:attr:`VideoResult.tubes`). One sequential pass;
    returns the frames written."""
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}{PARTIAL_SUFFIX}")   # renamed to dst once complete
    by_frame: dict[int, list] = {}
    for t in video_tubes:
        for frame, score, box in zip(t.frames.tolist(), t.frame_scores.tolist(), t.boxes.tolist()):
            by_frame.setdefault(frame, []).append((t.class_name, score, box, f"#{t.tube_id}"))
    count = 0
    try:
        writer = None
        for i, frame in enumerate(video.iter_frames(src)):
            if writer is None:   # the decoded size wins over the container's
                writer = video_writer.H264Writer(tmp, frame.shape[1], frame.shape[0], info.fps)
            shown = by_frame.get(i)
            writer.write(drawing.draw_detections(frame, shown) if shown else frame)
            count += 1
        if writer is None:
            raise video.VideoError(f"{src}: zero frames")
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return count


def remove_partial_annotations(annotated_dir) -> int:
    """Remove the half-written annotated videos a killed run left (:func:`annotate_video`'s temporary names); returns
    how many. Called before any video of a new run is annotated."""
    count = 0
    for path in pathlib.Path(annotated_dir).rglob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            count += 1
    return count


class Annotator:
    """Writes annotated videos in a background thread, one at a time, once a video's detections are known; then
    calls ``on_written(result)`` there (test.py records the video as complete)."""

    def __init__(self, enabled: bool, targets: dict, on_written=None):
        self.enabled, self.targets, self.futures = enabled, targets, {}
        self.on_written = on_written or (lambda _res: None)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate")

    def submit(self, res: VideoResult) -> None:
        target = self.targets[res.path]
        if os.path.realpath(target) == os.path.realpath(res.path):
            log.warning("%s: not annotated: the annotated file would overwrite the input", res.name)
            self.on_written(res)
            return
        self.futures[res.name] = (res.path, self.pool.submit(self._write, res, target))

    def _write(self, res: VideoResult, target) -> None:
        annotate_video(res.path, target, res.tubes, res.info)
        self.on_written(res)

    def wait(self) -> tuple[int, list[str]]:
        """Wait for all; returns ``(count written, failures as 'name: reason')``."""
        done, failures = 0, []
        for name, (path, future) in self.futures.items():
            try:
                future.result()
                done += 1
            except DECODE_ERRORS as err:
                failures.append(f"{name}: {one_line(err, path)}")
                log.warning("annotation FAILED %s", failures[-1])
        self.pool.shutdown()
        return done, failures
