#!/usr/bin/env python
"""STAR inference: predict actions (class, box, score, time span) for a folder of videos.

    python test.py --input_dir VIDEOS --output_file predictions.csv --model_path best_model.pth \
        [--score_threshold 0.3] [--window_sec 4 --stride_sec 2] [--labels DATASET_DIR]

Writes ``predictions.csv`` (``video_name,pred_class,score,x1,y1,x2,y2,start_sec,end_sec``, one row
per detection, boxes normalised xyxy; a video without detection gets one ``no_object`` row with an
empty box), ``<output stem>_frames.csv`` (``video_name,tube_id,frame,time_sec,pred_class,score,x1,y1,x2,y2``,
one row per tube per video frame where it is present: a tube-mode checkpoint's per-frame boxes, a clip-mode
one's constant box over its span), annotated H.264 videos (``annotated_videos/`` beside the output file,
each tube's box of the frame with its ``#id``) and ``test_log_<timestamp>.txt`` beside the output file. ``--labels DATASET_DIR`` also scores the
predictions with the training metrics. The pipeline is ``inference.py``; under ``torchrun`` each rank
takes its share of the videos and rank 0 writes the merged CSV.

Each rank records every video it completes (its CSV rows, once its annotated video is in place) in a hidden journal
beside the output file, flushed per video; rank 0 merges the journals into the CSVs at the end and removes them.
``--resume`` after a kill skips the videos the journals (or a finished run's CSVs) hold and predicts the rest: the
files end as those of an uninterrupted run. Exit status 1 when no video at all could be predicted.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import pathlib
import sys
import time

import checkpoint
import clip_loader
import inference
import predictions_io
import scoring
import video
from annotated_videos import remove_partial_annotations
from cutting import TRAINED, choose_cut
from model_description import ModelDescription
from runtime import (UsageError, autocast_settings, gather, init_distributed, number, resolve_device, run_cli,
                     setup_logging, writable_dir)

log = logging.getLogger("star.test")

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="STAR inference on a folder of videos", add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input_dir", required=True,
                        help="folder of videos (.mp4 .avi .mov .mkv, any letter case) or one video file")
    parser.add_argument("--output_file", default="predictions.csv", help="predictions CSV to write")
    parser.add_argument("--model_path", default="best_model.pth",
                        help="STAR checkpoint (this project's, or the published raw state_dict)")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="a query is a detection when its best foreground probability is at least this")
    parser.add_argument("--annotated_dir", default=None,
                        help="where annotated videos go (default: annotated_videos/ beside the output file)")
    parser.add_argument("--no_annotate", action="store_true", help="do not write annotated videos")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = fp16 autocast on cuda, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--batch_size", type=number(int, 1), default=None,
                        help="clips per network call (default: 1 on cpu, 8 on cuda)")
    parser.add_argument("--workers", type=number(int, 0), default=None,
                        help="background decoding processes (0 = decode in the main process; "
                             "default: 1 on cpu, 4 on cuda)")
    parser.add_argument("--class_names", nargs="+", default=None,
                        help="class names, in class-id order (for a raw checkpoint that stores none)")
    parser.add_argument("--window_sec", type=number(float, 0, strict=True), default=None,
                        help="long-video mode: predict windows of this many seconds (default: the checkpoint's "
                             "training windows when it was trained on windows, else the whole video = 1 clip)")
    parser.add_argument("--stride_sec", type=number(float, 0, strict=True), default=None,
                        help="long-video mode: seconds between window starts (default: --window_sec; a tube-mode "
                             "checkpoint's own windows: half a window)")
    parser.add_argument("--labels", default=None, metavar="DATASET_DIR",
                        help="dataset folder in the training layout: score the predictions against its labels")
    parser.add_argument("--resume", action="store_true",
                        help="skip the videos whose outputs a killed (or finished) run into the same --output_file "
                             "already completed (CSV rows and annotated video); predict the rest")
    parser.add_argument("--recursive", action="store_true", help="also look for videos in sub-folders")
    parser.add_argument("--fps", type=number(float, 0, strict=True), default=video.DEFAULT_FOLDER_FPS,
                        help="frame rate of videos given as folders of numbered frames (00001.jpg, ...)")
    return parser


def prepare_output(args, rank: int) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Create the output folders and check them writable (the annotated videos' too), start logging; returns
    ``(output file, log file or None)``. An unwritable folder stops the run here, before the model is loaded."""
    out = pathlib.Path(args.output_file)
    writable_dir(out.parent, "--output_file")
    if not args.no_annotate:
        writable_dir(annotated_folder(args), "--annotated_dir")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    log_path = out.parent / f"test_log_{stamp}.txt" if rank == 0 else None
    setup_logging(log_path, rank)
    log.info("command: %s", " ".join(sys.argv))
    return out, log_path


def annotated_folder(args) -> pathlib.Path:
    """``--annotated_dir``, else ``annotated_videos/`` beside the output file."""
    if args.annotated_dir:
        return pathlib.Path(args.annotated_dir)
    return pathlib.Path(args.output_file).parent / "annotated_videos"


def main(args) -> int:
    started = time.perf_counter()
    rank, world, local_rank = init_distributed(args.device)
    out, log_path = prepare_output(args, rank)
    device = resolve_device(args.device, local_rank)
    dtype, precision_note = autocast_settings(device, args.precision)
    annotated_dir = annotated_folder(args)
    videos = clip_loader.list_videos(args.input_dir, args.recursive,
                                     exclude=None if args.no_annotate else annotated_dir)
    if not videos:
        raise UsageError(f"--input_dir {args.input_dir}: no videos ({' '.join(video.VIDEO_EXTENSIONS)}, any case, "
                         "or folders of numbered frames)")
    names = clip_loader.video_names(videos, args.input_dir)
    targets = clip_loader.annotated_paths(names, annotated_dir)
    model, desc = inference.load_model(args.model_path, device, args.class_names)
    if desc.source == "onnx":   # onnxruntime runs the graph as exported; torch's autocast has nothing to do
        dtype, precision_note = None, f"onnxruntime {model.precision}"
    cut = choose_cut(desc, args.window_sec, args.stride_sec)   # as the checkpoint was trained, unless told
    settings = inference.Settings(
        args.score_threshold, cut.window_sec, cut.stride_sec, annotate=not args.no_annotate,
        batch_size=args.batch_size or (8 if device.type == "cuda" else 1),
        workers=args.workers if args.workers is not None else (4 if device.type == "cuda" else 1), folder_fps=args.fps)
    labels = scoring.load_labels(args.labels, desc.class_names, desc.raw_class_ids, args.fps) if args.labels else None
    log.info("%d video(s) from %s (%s%s), threshold %g; %s, batch %d, %d decoding worker(s)", len(videos),
             args.input_dir, settings.mode, " as the checkpoint was trained" if cut.why == TRAINED else "",
             args.score_threshold, precision_note, settings.batch_size, settings.workers)
    key = run_key(args, desc, settings)
    done = resume_point(args, out, names, targets, annotated_dir, key, rank, world)

    t_net = time.perf_counter()
    todo = [i for i, name in enumerate(names) if name not in done]
    mine = todo[rank::world]   # under torchrun each rank takes every world-th video still to do
    journal = predictions_io.Journal(predictions_io.journal_path(out, rank), key, append=args.resume)
    try:
        results, clips, annotated, failures = inference.run_videos(
            model, desc, [videos[i] for i in mine], [names[i] for i in mine], [targets[i] for i in mine],
            settings, device, dtype, rank, on_complete=journal.record)
    finally:
        journal.close()
    elapsed_net = time.perf_counter() - t_net
    # Under torchrun every rank sends its results to every rank; rank 0 writes.
    parts = gather(([dataclasses.replace(r, queries=r.queries if args.labels else []) for r in results],
                    clips, annotated, failures), world)
    order = {name: i for i, name in enumerate(names)}
    all_results = sorted((r for part in parts for r in part[0]), key=lambda r: order[r.name])
    if rank == 0:
        write_outputs(out, names, done, all_results, desc)
        if labels is not None:
            if done:
                log.warning("--labels with --resume: the %d video(s) completed before are not scored (their network "
                            "outputs are not kept); run without --resume to score every video", len(done))
            scoring.evaluate_predictions(all_results, args.labels, desc.class_names, desc.raw_class_ids,
                                         args.score_threshold, out, labels)
        summary(all_results, len(done), sum(p[1] for p in parts), sum(p[2] for p in parts),
                [f for p in parts for f in p[3]], annotated_dir, args, time.perf_counter() - started, elapsed_net,
                log_path)
    status = exit_status(all_results, len(done), rank)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return status


def run_key(args, desc: ModelDescription, settings) -> dict:
    """What makes a video's rows what they are; a journal written under other values is not resumed."""
    return {"model_path": os.path.abspath(args.model_path), "class_names": list(desc.class_names),
            "score_threshold": settings.score_threshold, "window_sec": settings.window_sec,
            "stride_sec": settings.stride_sec, "fps": settings.folder_fps}


def resume_point(args, out, names, targets, annotated_dir, key: dict, rank: int, world: int) -> dict:
    """The videos whose outputs are already complete, ``{name: (rows, frame rows)}`` (rows on rank 0 only): with
    ``--resume``, those in the journals of a killed run and in a finished run's CSVs, with their annotated video
    present; without it, none (the old journals are removed). Rank 0 decides and every rank takes its list, so that
    all ranks split the remaining videos alike; half-written annotated videos are removed first."""
    done = {}
    if rank == 0:
        if not args.no_annotate:
            remove_partial_annotations(annotated_dir)
        if args.resume:
            done = completed_videos(out, names, targets, key, annotate=not args.no_annotate)
            log.info("--resume: %d of %d video(s) already complete in %s, %d to do", len(done), len(names),
                     out.parent, len(names) - len(done))
        else:
            for path in predictions_io.journal_paths(out):
                path.unlink()
    shared = gather(sorted(done), world)[0]   # also a barrier: no rank writes its journal before this
    return done if rank == 0 else dict.fromkeys(shared)


def completed_videos(out, names, targets, key: dict, annotate: bool) -> dict:
    """``{name: (rows, frame rows)}`` of the listed videos complete in the outputs: a finished run's CSVs, then every
    journal (a kill may have left them from more ranks than now); with annotation, only where the video exists."""
    found = predictions_io.read_outputs(out)
    for path in predictions_io.journal_paths(out):
        found.update(predictions_io.read_journal(path, key))
    target_of = dict(zip(names, targets))
    return {name: found[name] for name in names
            if name in found and (not annotate or pathlib.Path(target_of[name]).is_file())}


def write_outputs(out, names, done: dict, results, desc: ModelDescription) -> None:
    """predictions.csv and the frames CSV of every video, in input order: the rows of the videos completed before
    (``done``) and of this run's; then the journals are removed (the CSVs hold all they held)."""
    new = {r.name: (predictions_io.csv_rows(r), list(predictions_io.frame_rows(r))) for r in results if r.error is None}
    merged = [done.get(name) or new.get(name) for name in names]
    merged = [m for m in merged if m is not None]
    rows = [row for video_rows, _ in merged for row in video_rows]
    predictions_io.write_predictions(rows, out)
    log.info("predictions written to %s (%d rows)", out, len(rows))
    frames_out = predictions_io.frames_csv_path(out)
    count = predictions_io.write_frame_predictions((row for _, frame_rows in merged for row in frame_rows), frames_out)
    log.info("per-frame tubes written to %s (%d rows, %s)", frames_out, count,
             "tube mode" if desc.tube_mode else "clip mode: one box per tube")
    for path in predictions_io.journal_paths(out):
        path.unlink()


EXIT_NOTHING_PREDICTED = 1


def exit_status(results, resumed: int, rank: int) -> int:
    """0 when at least one video has its predictions (some failures are listed in the summary); else 1, with the
    reason in one line: every video failed, or the model could not run on any clip."""
    failed = [r for r in results if r.error]
    if resumed or len(failed) < len(results):
        return 0
    if rank == 0:
        log.error("error: none of the %d video(s) could be predicted (first: %s: %s)", len(failed), failed[0].name,
                  failed[0].error)
    return EXIT_NOTHING_PREDICTED


def summary(results, resumed, clips, annotated, annotation_failures, annotated_dir, args, seconds, net_seconds,
            log_path) -> None:
    """The run in a few lines: videos (done before, predicted, failed with the reasons), detections, clips, time."""
    failed = [r for r in results if r.error]
    ok = len(results) - len(failed)
    detections = sum(len(r.detections) for r in results if r.error is None)
    before = f"{resumed} complete before (--resume), " if resumed else ""
    lines = ["summary:",
             f"  videos      : {len(results) + resumed} ({before}{ok} predicted, {len(failed)} failed)",
             f"  per video   : {net_seconds / max(len(results), 1):.2f} s over this run's {len(results)}",
             f"  detections  : {detections} (score >= {args.score_threshold:g}); "
             f"{sum(1 for r in results if r.error is None and not r.detections)} video(s) no_object",
             f"  clips       : {clips} in {net_seconds:.1f} s ({clips / max(net_seconds, 1e-9):.2f} clips/s)",
             f"  seconds     : {seconds:.1f} end to end",
             f"  predictions : {args.output_file}",
             f"  frames      : {predictions_io.frames_csv_path(args.output_file)}"]
    if not args.no_annotate:
        lines.append(f"  annotated   : {annotated} video(s) in {annotated_dir}"
                     + (f", {len(annotation_failures)} failed" if annotation_failures else ""))
    if log_path:
        lines.append(f"  log         : {log_path}")
    if failed:
        lines.append("  failures:")
        lines += [f"    {r.name}: {r.error}" for r in failed]
    if annotation_failures:
        lines.append("  annotation failures:")
        lines += [f"    {f}" for f in annotation_failures]
    log.info("\n".join(lines))


def cli(argv=None) -> int:
    return run_cli(main, get_args_parser().parse_args(argv), errors=(checkpoint.CheckpointError,))


if __name__ == "__main__":
    sys.exit(cli())
