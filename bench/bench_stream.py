#!/usr/bin/env python
"""stream.py on a 25 fps file source: the highest input rate it keeps up with, and its latency.

    python bench/bench_stream.py                       # 8x112 and 16x224, --stride 4 and 8, 1x 2x 4x (~3 min)
    python bench/bench_stream.py --quick               # 8x112, stride 8, 1x and 2x for 4 s each: checks the script
    python bench/bench_stream.py --speeds 1 2 4 8 --threads 1

The source is ``../shared/media/bikes.mp4`` (640x272, 25 fps, 10 s) when present, else a generated 640x360
25 fps video of the same length. For each clip size (``TxS``: a real-size ``STAR(num_classes=2)`` with random
weights, saved as a raw state_dict and loaded the way stream.py loads it, with ``--class_names`` and the size
given as stream.py's ``--num_frames``/``--img_size``), each ``--stride`` and each ``--speeds`` multiple of the
file's rate, the file is played through ``stream.run_stream`` as a camera delivers it (the reader sleeps to the
frame clock), events written to a CSV as stream.py does. Per run:

- input fps: frames through the main loop per second, first to last frame (the asked rate when it keeps up);
- dropped: frames the main loop fell a whole queue (1 s) behind on; lag: how late the file's reader was on its
  frame clock at worst (decoding too slow);
- predicted: clips predicted of those due (one every --stride frames); the others were skipped for newer clips;
- latency: from the arrival of a clip's last frame to its result, median and p95; trend: median of the last
  third of the predictions minus the first third (a growing lag shows as a trend >> 0).

Two verdicts per run: real time (the issue's "no growing lag"): no frame dropped, the reader never more than
0.5 s late, the latency trend under 0.5 s; every clip: besides, at least 95 % of the due clips predicted. When
clips were skipped, stride x predictions per second estimates the highest rate at which every clip would be.
The issue's goal: real time at 8x112 on 2 cores with median latency under 1 s.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import inference
import model as star_model
import runtime
import sources
import stream
import stream_state
import video_writer
from bench import common

MEDIA = common.ROOT.parent / "shared" / "media" / "bikes.mp4"
CLASS_NAMES = ("fight", "collapse")
KEEP_UP_LAG_SEC = 0.5     # the reader may be this late on the frame clock, and the latency may grow this much
EVERY_CLIP_SHARE = 0.95   # "every clip predicted": at least this share of the due clips
GOAL_MEDIAN_SEC = 1.0     # the latency goal at 8x112 on 2 cores


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["8x112", "16x224"], help="clip sizes TxS (frames x pixels)")
    p.add_argument("--strides", nargs="+", type=int, default=[4, 8], help="stream.py --stride values")
    p.add_argument("--speeds", nargs="+", type=float, default=[1.0, 2.0, 4.0],
                   help="play the file at these multiples of its rate (1 = 25 fps in)")
    p.add_argument("--source", default=None, help="the file source (default: ../shared/media/bikes.mp4, else generated)")
    p.add_argument("--seconds", type=float, default=None, help="wall seconds per run at most (default: the whole file)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="as stream.py's (auto: bf16 where the CPU has it natively)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--annotate", action="store_true", help="also write the annotated MP4 (costs H.264 encoding)")
    p.add_argument("--quick", action="store_true", help="smoke test: 8x112, stride 8, 1x and 2x, 4 s each")
    return p


# --------------------------------------------------------------------------- inputs


def make_source(folder: pathlib.Path, seconds: float = 10.0, fps: int = 25) -> pathlib.Path:
    """A 640x360 25 fps H.264 video with a moving block (when the shared footage is absent)."""
    path = folder / "source_25fps.mp4"
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
    with video_writer.H264Writer(path, 640, 360, fps) as writer:
        for i in range(int(seconds * fps)):
            frame = background.copy()
            x = (i * 8) % (640 - 80)
            frame[140:220, x:x + 80] = 255
            writer.write(frame)
    return path


def save_random_model(folder: pathlib.Path) -> pathlib.Path:
    """Real-size STAR(num_classes=2), random weights (seeded), as a raw state_dict like the published file."""
    torch.manual_seed(0)
    path = folder / "star_random.pth"
    torch.save(star_model.STAR(len(CLASS_NAMES)).state_dict(), path)
    return path


def parse_size(text: str) -> tuple[int, int]:
    frames, _, pixels = text.lower().partition("x")
    return int(frames), int(pixels)


# --------------------------------------------------------------------------- one run


def trend(latencies) -> float | None:
    """Median latency of the last third minus the first third; None with fewer than 6 predictions."""
    values = list(latencies)
    if len(values) < 6:
        return None
    third = len(values) // 3
    return statistics.median(values[-third:]) - statistics.median(values[:third])


def measure(spec, net, desc, device, dtype, stride: int, speed: float, args, folder) -> dict:
    """One play of the file through stream.run_stream; the row's figures."""
    settings = stream_state.StreamSettings(stride=stride, speed=speed, score_threshold=0.5,
                                           events=str(folder / "events.csv"), max_seconds=args.seconds,
                                           output=str(folder / "annotated.mp4") if args.annotate else None)
    stats = stream.run_stream(spec, net, desc, settings, device, dtype)
    grow = trend(stats.latencies)
    kept = stats.dropped_frames == 0 and stats.max_lag_sec <= KEEP_UP_LAG_SEC and (grow is None or grow < KEEP_UP_LAG_SEC)
    every = kept and stats.predictions >= EVERY_CLIP_SHARE * stats.clips
    preds_per_sec = stats.predictions / stats.input_sec if stats.input_sec > 0 else float("nan")
    return {"stats": stats, "fps_in": stats.input_fps, "trend": grow, "kept": kept, "every": every,
            "preds_per_sec": preds_per_sec}


def row(size: str, stride: int, speed: float, fps: float, m: dict) -> list:
    s = m["stats"]
    share = f"{s.predictions}/{s.clips} ({100 * s.predictions / max(s.clips, 1):.0f} %)"
    return [size, stride, f"{speed:g}x = {fps * speed:.0f}", common.num(m["fps_in"]), s.dropped_frames,
            f"{s.max_lag_sec:.2f}", share, common.num(m["preds_per_sec"]), common.num(s.latency(0.5)),
            common.num(s.latency(0.95)), "n/a" if m["trend"] is None else f"{m['trend']:+.2f}",
            "yes" if m["kept"] else "NO", "yes" if m["every"] else "no"]


HEADERS = ["size", "stride", "input fps asked", "input fps", "dropped", "max lag s", "predicted", "pred/s",
           "latency median s", "latency p95 s", "trend s", "real time", "every clip"]
SUMMARY = ["size", "stride", "real time up to", "every clip predicted up to", "latency median / p95 at the lowest rate"]


# --------------------------------------------------------------------------- main


def run_size(size: str, args, model_path, source, folder) -> tuple[list, list]:
    """All strides and speeds of one clip size; returns (rows, highest speed kept up per stride)."""
    frames, pixels = parse_size(size)
    device = runtime.resolve_device("cpu")
    dtype, note = runtime.autocast_settings(device, args.precision)
    t0 = time.perf_counter()
    net, desc = inference.load_model(model_path, device, list(CLASS_NAMES))
    desc, _ = stream.model_info(desc, frames, pixels)
    print(f"{size}: model loaded in {time.perf_counter() - t0:.1f} s; {note}", file=sys.stderr, flush=True)
    spec = sources.parse_source(str(source))
    fps = sources.FileSource(spec).fps
    rows, best = [], []
    for stride in args.strides:
        runs = {}
        for speed in sorted(args.speeds):
            runs[speed] = measure(spec, net, desc, device, dtype, stride, speed, args, folder)
            rows.append(row(size, stride, speed, fps, runs[speed]))
            print(common.markdown_table(HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
        best.append(summary_row(size, stride, fps, runs))
    return rows, best


def summary_row(size: str, stride: int, fps: float, runs: dict) -> list:
    """The highest rate tried that kept real time / predicted every clip; an estimate for the latter when none did."""
    def highest(key):
        speeds = [speed for speed, m in runs.items() if m[key]]
        if not speeds:
            return None
        top = max(speeds)
        return f"{top * fps:.0f} fps ({top:g}x)" + (", the highest tried" if top == max(runs) else "")
    every = highest("every")
    if every is None:   # saturated: the model's rate times the stride is the input rate it could follow
        rate = max(m["preds_per_sec"] for m in runs.values()) * stride
        every = f"below {min(runs) * fps:.0f} fps (about {rate:.0f} fps: stride x pred/s)"
    low = runs[min(runs)]["stats"]
    return [size, stride, highest("kept") or f"below {min(runs) * fps:.0f} fps", every,
            f"{common.num(low.latency(0.5))} / {common.num(low.latency(0.95))} s"]


def main(args) -> int:
    if args.quick:
        args.sizes, args.strides, args.speeds, args.seconds = ["8x112"], [8], [1.0, 2.0], 4.0
    if args.threads:
        torch.set_num_threads(args.threads)
    common.print_machine("cpu")
    runtime.setup_logging()
    logging.getLogger("star").setLevel(logging.WARNING)   # the tables, not every run's log
    with tempfile.TemporaryDirectory(prefix="star_bench_stream_") as tmp:
        folder = pathlib.Path(tmp)
        source = pathlib.Path(args.source) if args.source else (MEDIA if MEDIA.is_file() else make_source(folder))
        print(f"source: {source}; sizes {' '.join(args.sizes)}, strides {args.strides}, speeds {args.speeds}, "
              f"torch threads {torch.get_num_threads()}, annotated output {'on' if args.annotate else 'off'}\n")
        model_path = save_random_model(folder)
        print("| " + " | ".join(HEADERS) + " |\n|" + "---|" * len(HEADERS), flush=True)
        best = []
        for size in args.sizes:
            best += run_size(size, args, model_path, source, folder)[1]
    print("\nhighest input rate kept up with (real time: no dropped frame, reader <= 0.5 s late, latency not "
          f"growing; every clip: also >= {EVERY_CLIP_SHARE:.0%} of the due clips predicted):\n")
    print(common.markdown_table(SUMMARY, best))
    print(f"\ngoal: real time at 8x112 on 2 cores with median latency under {GOAL_MEDIAN_SEC:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
