#!/usr/bin/env python
"""Live tube events on labelled videos played as a camera delivers them: recall, precision and delays.

    python bench/bench_tube_events.py --model_path RUN/best_model.pth --data_dir UNSEEN   # ~1 s per second of video
    python bench/bench_tube_events.py --model_path RUN/best_model.pth --data_dir UNSEEN --videos 12 --per_stream 3

``--data_dir``: a dataset with per-frame labels (``tools/make_sample_data.py --per_frame`` makes one; use videos the
model never saw). Its first ``--videos`` videos are joined, ``--per_stream`` at a time, into streams (H.264 at the
first video's size and rate; each video after ``--pause_sec`` of its first frame held), and each stream is played through ``stream.run_stream`` at
its own rate with ``--tube_events`` written as stream.py writes it. A true action is one segment of one labelled
track (its frames and class); an event tube is a start row and the end row of its ``tube_id``.

- match: same class, time IoU of ``[action_start_sec, action_end_sec]`` and the true span >= 0.5, and the centre of
  the end row's box (the tube's last frame) inside the region the actor covered while acting (the union of its
  labelled boxes: a tube that outlasts a walk ends where the walker went on); one-to-one, the highest time IoU first;
- recall: matched true actions / true actions; precision: matched event tubes / event tubes;
- start delay: from the true first frame of the action to its start row (stream time of the decision plus the
  row's latency); end delay: from the true end (one frame after its last) to its end row;
- latency (clip arrival to result) and peak RSS as bench/bench_stream.py reports them.

Goals (issue 38, 2 cores, 8x112): recall and precision >= 0.8, start delay median <= 1.5 s.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
import tempfile

import cv2
import numpy as np
import torch

import inference
import scoring
import sources
import stream
import stream_state
import video
import video_writer
from bench import common
from records import load_dataset
from runtime import autocast_settings, setup_logging

TIME_IOU = 0.5


@dataclasses.dataclass
class TrueAction:
    """One labelled action on a stream: class, first and last frame (inclusive), the actor's labelled boxes."""

    class_id: int
    first: int
    last: int
    frames: np.ndarray
    boxes: np.ndarray   # normalised xyxy at ``frames``


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="a tube-mode checkpoint (trained on per-frame labels)")
    p.add_argument("--data_dir", required=True, help="dataset with per-frame labels, unseen by the model")
    p.add_argument("--videos", type=int, default=24, help="how many of its videos (sorted by name) to play")
    p.add_argument("--per_stream", type=int, default=6, help="videos joined into one stream")
    p.add_argument("--pause_sec", type=float, default=2.0,
                   help="before each video its first frame is held this long: separate scenes, not one actor")
    p.add_argument("--stride", type=int, default=8, help="stream.py --stride: predict every N frames")
    p.add_argument("--score_threshold", type=float, default=0.5, help="stream.py --score_threshold")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="stream.py --precision")
    p.add_argument("--work_dir", default=None, help="keep the streams and events here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    return p


def build_stream(records, path: pathlib.Path, pause_sec: float) -> tuple[float, int, list[TrueAction]]:
    """Join ``records``' videos into one H.264 file, each after ``pause_sec`` of its first frame held (its actors
    standing still); returns the file's fps, frame count and true actions."""
    fps = video.probe_video(records[0].path).fps
    writer, offset, actions = None, 0, []
    for record in records:
        count = 0
        for k, frame in enumerate(video.iter_frames(record.path)):   # every video at the first one's rate and size
            if writer is None:
                height, width = frame.shape[:2]
                writer = video_writer.H264Writer(path, width, height, fps)
            if frame.shape[:2] != (height, width):
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            for _ in range(int(round(pause_sec * fps)) if k == 0 else 0):
                writer.write(frame)
                offset += 1
            writer.write(frame)
            count += 1
        actions += [dataclasses.replace(a, first=a.first + offset, last=a.last + offset, frames=a.frames + offset)
                    for a in true_actions(record)]
        offset += count
    writer.close()
    return fps, offset, actions


def true_actions(record) -> list[TrueAction]:
    """A record's tracks cut into actions: each segment of a track, at its most frequent class."""
    out = []
    for track in record.tracks or []:
        for first, last in track.segments():
            on = (track.frames >= first) & (track.frames <= last)
            classes = [c for labels, keep in zip(track.labels, on) if keep for c in labels]
            if classes:
                out.append(TrueAction(max(set(classes), key=classes.count), first, last, track.frames[on],
                                      np.asarray(track.boxes, dtype=np.float64)[on]))
    return out


def event_tubes(path: pathlib.Path) -> list[dict]:
    """Start rows joined with their end rows: ``{class, start_row, end_row}`` per tube_id."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    starts = {r["tube_id"]: r for r in rows if r["event"] == "start"}
    ends = {r["tube_id"]: r for r in rows if r["event"] == "end"}
    return [{"class": starts[k]["pred_class"], "start": starts[k], "end": ends[k]} for k in starts if k in ends]


def match(tubes: list[dict], actions: list[TrueAction], names, fps: float) -> list[tuple[int, int]]:
    """One-to-one (tube index, action index) pairs: same class, time IoU >= TIME_IOU, the actor's region; the highest
    time IoU first."""
    candidates = []
    for i, tube in enumerate(tubes):
        a0, a1 = float(tube["end"]["action_start_sec"]), float(tube["end"]["action_end_sec"])
        x1, y1, x2, y2 = (float(tube["end"][k]) for k in ("x1", "y1", "x2", "y2"))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        for j, act in enumerate(actions):
            if names[act.class_id] != tube["class"]:
                continue
            t0, t1 = act.first / fps, (act.last + 1) / fps
            tiou = max(0.0, min(a1, t1) - max(a0, t0)) / (max(a1, t1) - min(a0, t0))
            (u1, v1), (u2, v2) = act.boxes[:, :2].min(0), act.boxes[:, 2:].max(0)
            if tiou >= TIME_IOU and u1 <= cx <= u2 and v1 <= cy <= v2:
                candidates.append((tiou, i, j))
    pairs, used_t, used_a = [], set(), set()
    for _, i, j in sorted(candidates, reverse=True):
        if i not in used_t and j not in used_a:
            pairs.append((i, j))
            used_t.add(i)
            used_a.add(j)
    return pairs


def quantiles(values) -> tuple[float, float]:
    return (float(np.median(values)), float(np.quantile(values, 0.95))) if values else (float("nan"), float("nan"))


def play(path: pathlib.Path, net, desc, args, device, dtype, events: pathlib.Path):
    """The stream through stream.py's run; returns its stats and the tubes joined once it ended (test.py's)."""
    settings = stream_state.StreamSettings(stride=args.stride, score_threshold=args.score_threshold,
                                           tube_events=str(events))
    desc, settings.clip_sec = stream.model_info(desc)
    run = stream.StreamRun(sources.parse_source(str(path)), net, desc, settings, device, dtype)
    stats = run.run()
    return stats, run.live.final


def as_event_tubes(final, fps: float) -> list[dict]:
    """Joined tubes in :func:`event_tubes`' form (their end row only; no delays)."""
    out = []
    for t in final:
        box = dict(zip(("x1", "y1", "x2", "y2"), (float(v) for v in t.boxes[-1])))
        out.append({"class": t.class_name, "end": {"action_start_sec": t.frames[0] / fps,
                                                   "action_end_sec": (t.frames[-1] + 1) / fps, **box}})
    return out


def main(args) -> int:
    setup_logging()
    machine = common.print_machine("cpu")
    records, class_map, _ = load_dataset(args.data_dir)
    records = sorted([r for r in records if r.tracks is not None or not r.labels], key=lambda r: r.path)[:args.videos]
    device = torch.device("cpu")
    dtype, note = autocast_settings(device, args.precision)
    net, desc = inference.load_model(args.model_path, device)
    to_model = scoring.model_index_of_dataset_classes(class_map, desc.class_names, desc.raw_class_ids)
    names = desc.class_names
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="star_tube_events_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, totals = [], {"actions": 0, "tubes": 0, "matched": 0, "start": [], "end": [], "latency": [], "joined": 0,
                        "joined_matched": 0}
    for k in range(0, len(records), args.per_stream):
        group = records[k:k + args.per_stream]
        path, events = work / f"stream_{k // args.per_stream}.mp4", work / f"tube_events_{k // args.per_stream}.csv"
        fps, frames, actions = build_stream(group, path, args.pause_sec)
        actions = [dataclasses.replace(a, class_id=to_model[a.class_id]) for a in actions]
        stats, final = play(path, net, desc, args, device, dtype, events)
        tubes = event_tubes(events)
        pairs = match(tubes, actions, names, fps)
        totals["joined"] += len(final)
        totals["joined_matched"] += len(match(as_event_tubes(final, fps), actions, names, fps))
        start = [float(tubes[i]["start"]["stream_time_sec"]) + float(tubes[i]["start"]["latency_sec"])
                 - actions[j].first / fps for i, j in pairs]
        end = [float(tubes[i]["end"]["stream_time_sec"]) + float(tubes[i]["end"]["latency_sec"])
               - (actions[j].last + 1) / fps for i, j in pairs]
        totals["actions"] += len(actions)
        totals["tubes"] += len(tubes)
        totals["matched"] += len(pairs)
        totals["start"] += start
        totals["end"] += end
        totals["latency"] += list(stats.latencies)
        rows.append([path.name, f"{frames / fps:.0f} s", len(actions), len(tubes), len(pairs),
                     f"{len(pairs) / max(len(actions), 1):.2f}", f"{len(pairs) / max(len(tubes), 1):.2f}",
                     "%.2f / %.2f" % quantiles(start), "%.2f / %.2f" % quantiles(end),
                     f"{stats.predictions}/{stats.clips}"])
    recall = totals["matched"] / max(totals["actions"], 1)
    precision = totals["matched"] / max(totals["tubes"], 1)
    rows.append(["all", "", totals["actions"], totals["tubes"], totals["matched"], f"{recall:.2f}",
                 f"{precision:.2f}", "%.2f / %.2f" % quantiles(totals["start"]),
                 "%.2f / %.2f" % quantiles(totals["end"]), ""])
    lat = quantiles(totals["latency"])
    joined_recall = totals["joined_matched"] / max(totals["actions"], 1)
    joined_precision = totals["joined_matched"] / max(totals["joined"], 1)
    print(f"\nmodel {args.model_path} ({note}); {len(records)} videos of {args.data_dir}, {args.per_stream} per "
          f"stream, --stride {args.stride}; work folder {work}\n")
    print(common.markdown_table(["stream", "length", "true actions", "event tubes", "matched", "recall", "precision",
                                 "start delay s (median / p95)", "end delay s (median / p95)", "predicted"], rows))
    print(f"\nthe same clips joined after each stream ended (test.py's rules): recall {joined_recall:.2f}, precision "
          f"{joined_precision:.2f} ({totals['joined']} tubes)")
    print(f"latency median {lat[0]:.3f} s, p95 {lat[1]:.3f} s; peak RSS {common.self_peak_rss_mb():.0f} MB")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "machine": machine, "recall": recall, "precision": precision, "start_delay_sec": quantiles(totals["start"]),
            "end_delay_sec": quantiles(totals["end"]), "latency_sec": lat, "joined_recall": joined_recall,
            "joined_precision": joined_precision, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
