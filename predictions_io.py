"""The prediction files of test.py and app.py: predictions.csv rows (:func:`csv_rows`, one per detection or tube),
the per-frame tubes CSV (:func:`frame_rows`, ``X.csv`` -> ``X_frames.csv``), and test.py's resume journal (one JSON
line per completed video, :class:`Journal`; :func:`read_journal` and :func:`read_outputs` read back what a killed or
finished run completed).
"""
from __future__ import annotations

import csv
import json
import pathlib
import threading
from typing import Iterable, Iterator

import postprocess
from detections import VideoResult
from files import atomic_write
from runtime import UsageError

NO_OBJECT = postprocess.NO_OBJECT_NAME
CSV_FIELDS = ("video_name", "pred_class", "score", "x1", "y1", "x2", "y2", "start_sec", "end_sec")
FRAME_FIELDS = ("video_name", "tube_id", "frame", "time_sec", "pred_class", "score", "x1", "y1", "x2", "y2")


def csv_rows(result: VideoResult) -> list[dict]:
    """The CSV rows of one predicted video; a ``no_object`` row (empty box, best score seen,
    the whole video's span) when nothing passed the threshold."""
    if not result.detections:
        duration = result.info.duration_sec if result.info else 0.0
        return [{"video_name": result.name, "pred_class": NO_OBJECT, "score": f"{result.best_score:.4f}",
                 "x1": "", "y1": "", "x2": "", "y2": "", "start_sec": "0.000", "end_sec": f"{duration:.3f}"}]
    return [{"video_name": result.name, "pred_class": d.class_name, "score": f"{d.score:.4f}",
             **{k: f"{min(max(v, 0.0), 1.0):.4f}" for k, v in zip(("x1", "y1", "x2", "y2"), d.box)},
             "start_sec": f"{d.start_sec:.3f}", "end_sec": f"{d.end_sec:.3f}"} for d in result.detections]


def write_predictions(rows: Iterable[dict], path) -> None:
    """Write a predictions CSV (``CSV_FIELDS``, rows from :func:`csv_rows`) atomically."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def frames_csv_path(output_file) -> pathlib.Path:
    """Where the per-frame tubes go: ``X.csv`` -> ``X_frames.csv`` beside it."""
    out = pathlib.Path(output_file)
    return out.with_name(f"{out.stem}_frames{out.suffix}")


def frame_rows(result: VideoResult) -> Iterator[dict]:
    """The ``FRAME_FIELDS`` rows of one predicted video: per tube (tube_id order), one per frame where it is present,
    with its box and (interpolated) score at that frame."""
    fps = result.info.fps if result.info else 1.0
    for t in result.tubes:
        for frame, score, box in zip(t.frames.tolist(), t.frame_scores.tolist(), t.boxes.tolist()):
            yield {"video_name": result.name, "tube_id": t.tube_id, "frame": frame, "time_sec": f"{frame / fps:.3f}",
                   "pred_class": t.class_name, "score": f"{score:.4f}",
                   **{k: f"{min(max(v, 0.0), 1.0):.4f}" for k, v in zip(("x1", "y1", "x2", "y2"), box)}}


def write_frame_predictions(rows: Iterable[dict], path) -> int:
    """Write the per-frame tubes CSV (``FRAME_FIELDS``, rows from :func:`frame_rows`) atomically; returns the rows."""
    count = 0
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRAME_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


# --------------------------------------------------------------------------- resumable outputs (test.py --resume)


JOURNAL_VERSION = 1


def journal_path(output_file, rank: int) -> pathlib.Path:
    """Rank ``rank``'s journal of completed videos: hidden, beside the output file."""
    out = pathlib.Path(output_file)
    return out.with_name(f".{out.name}.rank{rank}.journal")


def journal_paths(output_file) -> list[pathlib.Path]:
    """Every rank's journal beside the output file (a killed run may have had more ranks than this one)."""
    out = pathlib.Path(output_file)
    return sorted(out.parent.glob(f".{out.name}.rank*.journal"))


class Journal:
    """One rank's record of the videos it completed: after a header with the run's settings, one JSON line per video
    (its predictions.csv and frames CSV rows), written and flushed once its outputs are complete, so a kill loses at
    most the videos in progress. test.py merges the journals into the CSVs at the end, then removes them; with
    ``--resume`` it reads them (:func:`read_journal`) and skips the videos they hold."""

    def __init__(self, path, settings: dict, append: bool):
        self.path = pathlib.Path(path)
        self.lock = threading.Lock()   # records come from the annotating thread and the main thread
        if append:
            _drop_torn_tail(self.path)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")   # noqa: SIM115 (closed in close())
        if self.file.tell() == 0:
            self._write({"star_journal": JOURNAL_VERSION, "settings": settings})

    def record(self, res: VideoResult) -> None:
        self._write({"video": res.name, "rows": csv_rows(res), "frames": list(frame_rows(res))})

    def _write(self, entry: dict) -> None:
        with self.lock:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _drop_torn_tail(path: pathlib.Path) -> None:
    """Cut a line a kill left half-written at the end of ``path``, so that the next line starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_journal(path, settings: dict) -> dict[str, tuple[list, list]]:
    """``{video name: (predictions.csv rows, frames CSV rows)}`` of a journal; a torn last line is skipped. A journal
    written with other settings (model, threshold, windows, class names) is a UsageError: its rows would differ."""
    done = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except ValueError:   # a line a kill cut short
                continue
            if not isinstance(entry, dict) or not ({"star_journal", "video"} & entry.keys()):
                raise UsageError(f"--resume: {path}, line {number}: not a test.py journal entry")
            if "star_journal" in entry:
                _check_journal_settings(path, entry.get("settings") or {}, settings)
                continue
            done[entry["video"]] = (entry.get("rows") or [], entry.get("frames") or [])
    return done


def _check_journal_settings(path, old: dict, new: dict) -> None:
    for key, value in new.items():
        if old.get(key) != value:
            raise UsageError(f"--resume: {path} was written with {key} {old.get(key)!r}, this run has {value!r}; "
                             "run with the same flags, or without --resume to start again")


def read_outputs(output_file) -> dict[str, tuple[list, list]]:
    """``{video name: (rows, frame rows)}`` from a finished run's predictions CSV and frames CSV (both must be there;
    else nothing is taken from them)."""
    out, frames = pathlib.Path(output_file), frames_csv_path(output_file)
    if not (out.is_file() and frames.is_file()):
        return {}
    rows, frame_rows_by = _rows_by_video(out, CSV_FIELDS), _rows_by_video(frames, FRAME_FIELDS)
    return {name: (video_rows, frame_rows_by.get(name, [])) for name, video_rows in rows.items()}


def _rows_by_video(path: pathlib.Path, fields) -> dict[str, list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(fields):
            raise UsageError(f"--resume: {path}: not a test.py output (header {reader.fieldnames}); "
                             "move it away or run without --resume")
        grouped: dict[str, list[dict]] = {}
        for row in reader:
            grouped.setdefault(row["video_name"], []).append(row)
    return grouped
