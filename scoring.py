"""``test.py --labels``: the predicted videos scored against a dataset's labels with the training metrics (clip
figures of ``metrics.py``; frame-mAP and video-mAP of ``tube_metrics.py`` when the labels are per frame), the report
saved beside the predictions.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
import torch

import metrics
import tube_metrics
import tubes
import video
from detections import VideoResult, span_frames
from files import write_text
from runtime import UsageError, one_line

log = logging.getLogger("star.inference")


def model_index_of_dataset_classes(class_map, model_names: Sequence[str], raw_ids=None) -> list[int]:
    """For each dataset class (contiguous id), the model's class id. By the checkpoint's raw ids when
    it stores them, else by name, else by position when the counts match; UsageError otherwise."""
    if raw_ids:
        lookup = {int(r): i for i, r in enumerate(raw_ids)}
        if all(int(r) in lookup for r in class_map.raw_ids):
            return [lookup[int(r)] for r in class_map.raw_ids]
    if all(n in model_names for n in class_map.names):
        return [list(model_names).index(n) for n in class_map.names]
    if len(class_map) == len(model_names):
        log.warning("--labels: dataset classes %s matched to the model's %s by position",
                    class_map.names, list(model_names))
        return list(range(len(class_map)))
    raise UsageError(f"--labels: the dataset's classes {class_map.names} do not match the model's "
                     f"{list(model_names)}")


def video_level_prediction(queries: Sequence[dict]) -> dict:
    """All queries of all clips of a video as one prediction (one clip = the published case)."""
    return {k: torch.cat([q[k] for q in queries]) for k in ("scores", "labels", "boxes")}


def load_labels(labels_dir, model_names, raw_ids=None, folder_fps: float = video.DEFAULT_FOLDER_FPS
                ) -> tuple[list, list[int]]:
    """The dataset's records and, per dataset class, the model's class id (checked before inference)."""
    from problems import DatasetError, format_problems
    from records import load_dataset
    try:
        records, class_map, problems = load_dataset(labels_dir, fps=folder_fps)
    except DatasetError as err:
        raise UsageError(f"--labels {labels_dir}: {one_line(err)}") from None
    if problems:
        log.warning("--labels: %d problem(s) in the dataset:\n%s", len(problems), format_problems(problems))
    return records, model_index_of_dataset_classes(class_map, model_names, raw_ids)


def evaluate_predictions(results: Sequence[VideoResult], labels_dir, model_names, raw_ids, threshold,
                         output_file, labels=None) -> dict | None:
    """Score the predicted videos that the dataset labels; print and save the report
    (``<output stem>_metrics.json`` and ``.txt`` beside the output file)."""
    records, to_model = labels or load_labels(labels_dir, model_names, raw_ids)
    by_path = {os.path.realpath(r.path): r for r in records}
    preds, targets = [], []
    for res in results:
        record = by_path.get(os.path.realpath(res.path))
        if record is None or res.error or not res.queries:
            continue
        preds.append(video_level_prediction(res.queries))
        targets.append({"labels": torch.tensor([to_model[c] for c in record.labels], dtype=torch.int64),
                        "boxes": torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)})
    if not preds:
        log.error("--labels: none of the predicted videos is in %s; nothing to score", labels_dir)
        return None
    unlabelled = sum(1 for r in results if not r.error) - len(preds)
    result = metrics.evaluate(preds, targets, list(model_names), threshold)
    if any(r.per_frame for r in records):
        result.update(score_tubes(results, by_path, to_model, list(model_names), threshold))
    report = metrics.format_report(result, list(model_names))
    log.info("evaluation against %s (%d video(s) scored, %d predicted video(s) not in the dataset):\n%s",
             labels_dir, len(preds), unlabelled, report)
    out = pathlib.Path(output_file)
    json_path, text_path = out.with_name(out.stem + "_metrics.json"), out.with_name(out.stem + "_metrics.txt")
    write_text(json_path, json.dumps(result, indent=2, default=_json_default) + "\n")
    write_text(text_path, report + "\n")
    log.info("evaluation saved to %s and %s", json_path, text_path)
    return result


def add_tube_predictions(scorer: tube_metrics.TubeScorer, res: VideoResult, width: int, height: int,
                         threshold: float) -> None:
    """A tube-mode video into ``scorer``: for frame-mAP every query as a detection of every class at each frame
    (:func:`tubes.class_detections`), with its interpolated box and that class's step probability (all queries,
    thresholded or not: recall counts in AP), from the one clip whose span's centre is nearest that frame
    (overlapping windows would otherwise detect each frame twice); for video-mAP the video's joined tubes
    (:attr:`VideoResult.tubes`). Boxes in pixels."""
    centres = np.array([(a + b - 1) / 2 for a, b in res.frame_spans], dtype=float)
    for clip, (pred, indices, span) in enumerate(zip(res.queries, res.frame_indices, res.frame_spans)):
        for view in tubes.class_detections(pred, threshold):
            frames, scores, boxes = tubes.dense(view, indices, span)
            own = np.abs(frames[:, None] - centres[None]).argmin(1) == clip       # first of equally near clips
            for label, q_scores, q_boxes in zip(view["labels"].tolist(), scores[:, own], boxes[:, own]):
                scorer.add_frame_detections(res.name, label, frames[own], q_scores, q_boxes, width, height)
    for t in res.tubes:
        scorer.add_tube(res.name, t.class_id, t.score, t.frames, t.boxes, width, height)


def score_tubes(results: Sequence[VideoResult], records_by_path: dict, to_model: Sequence[int],
                class_names: Sequence[str], threshold: float) -> dict:
    """frame-mAP and video-mAP (and per class: :meth:`tube_metrics.TubeScorer.result`) of whole videos against per-frame
    labels. Tube mode: :func:`add_tube_predictions`.
    Clip mode: frames: every query of every clip stands at each frame of its clip's span (one box per clip); tubes:
    the video's detections as written to predictions.csv (windows joined, above the threshold). The labels' tracks,
    interpolated as in training, are the ground truth."""
    scorer = tube_metrics.TubeScorer(len(class_names))
    for res in results:
        record = records_by_path.get(os.path.realpath(res.path))
        if record is None or res.error or not res.queries or not record.per_frame:
            continue
        if res.tube_mode:
            add_tube_predictions(scorer, res, record.width, record.height, threshold)
        else:
            for pred, (start, end) in zip(res.queries, res.spans):
                scorer.add_clip_predictions(res.name, span_frames(start, end, res.info), pred, record.width,
                                            record.height, as_tube=False)
            for d in res.detections:
                scorer.add_prediction(res.name, span_frames(d.start_sec, d.end_sec, res.info), d.class_id, d.score,
                                      d.box, record.width, record.height, as_frames=False)
        for track in record.tracks:
            frames, boxes, labels = track.dense()
            for c in sorted({c for ids in labels for c in ids}):
                acting = np.array([c in ids for ids in labels], bool)
                scorer.add_truth(res.name, to_model[c], frames[acting], boxes[acting], record.width, record.height)
    return scorer.result(class_names)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
