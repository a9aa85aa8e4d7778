#!/usr/bin/env python
"""Where a training run's time goes: the phases of the tester's command, as one table.

    python bench/bench_epoch.py --input_dir DATASET               # runs the tester's command (30 epochs) and profiles it
    python bench/bench_epoch.py --sample                          # the same on the tube sample data (--per_frame, seed 0)
    python bench/bench_epoch.py --input_dir DATASET --epochs 3    # a shorter run (the decoder phase shrinks with it)
    python bench/bench_epoch.py --log runs/x/train.log            # the table of a run already made
    python bench/bench_epoch.py --quick                           # tiny sample data, 1 epoch: checks the script

main.py times each phase of every epoch (data: decoding, augmentation and targets, or the wait for a loader worker;
forward; matching and losses; backward; optimizer) and of the run (validation, checkpoints, the decoder phase, the final
report) and logs them ("epoch N training time: ...", "run time: ..."); this reads them back. Start-up (dataset check,
model, the bf16 check) is the wall time the phases do not cover.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from bench import common

TESTER = ["--pretrained", "none", "--batch_size", "4", "--num_frames", "8", "--img_size", "112", "--workers", "1"]
PHASE = re.compile(r"([a-z][a-z ]*?) (\d+(?:\.\d+)?) s")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", help="a dataset (training layout) to run the tester's command on")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the run (the tester's command: 30)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="main.py --precision")
    p.add_argument("--log", help="profile this train.log instead of running main.py")
    p.add_argument("--sample", action="store_true", help="make the tube sample data (48 videos, seed 0) and use it")
    p.add_argument("--quick", action="store_true", help="tiny per-frame sample data, 1 epoch: checks the script")
    return p


def phases(text: str) -> dict[str, float]:
    """``{"data": 1.2, ...}`` of one "... time: data 1.2 s, forward 3.4 s (total 4.6 s)" line."""
    body = text.split("time:", 1)[1].split("(total", 1)[0]
    return {name.strip(): float(seconds) for name, seconds in PHASE.findall(body)}


def logged_seconds(lines: list[str]) -> float:
    """Seconds from the first to the last time-stamped line of a train.log (the run less interpreter start-up)."""
    stamps = [datetime.datetime.fromisoformat(line[:19]) for line in lines if re.match(r"\d{4}-\d\d-\d\dT", line)]
    return (stamps[-1] - stamps[0]).total_seconds() if stamps else 0.0


def read_log(path: pathlib.Path) -> tuple[dict[str, float], int, str, float]:
    """The run's phase seconds, its epochs, its precision line and its logged seconds, from a train.log."""
    lines = path.read_text(encoding="utf-8").splitlines()
    run = [line for line in lines if " run time: " in line]
    if not run:
        raise SystemExit(f"{path}: no 'run time:' line (an unfinished run, or one from before main.py timed phases)")
    epochs = sum(" training time: " in line for line in lines)
    precision = next((line.split("precision: ", 1)[1] for line in reversed(lines) if "precision: " in line), "?")
    return phases(run[-1]), epochs, precision, logged_seconds(lines)


def run_main(args, output_dir: pathlib.Path) -> float:
    """The tester's command (with ``--epochs``) into ``output_dir``; its wall seconds."""
    cmd = [sys.executable, str(common.ROOT / "main.py"), "--input_dir", args.input_dir, "--output_dir",
           str(output_dir), *TESTER, "--epochs", str(args.epochs), "--precision", args.precision,
           *(["--decoder_steps", "10"] if args.quick else [])]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def make_sample_data(folder: pathlib.Path, *size: str) -> str:
    """tools/make_sample_data.py's tube data (``--per_frame``, seed 0), ``size`` flags added."""
    subprocess.run([sys.executable, str(common.ROOT / "tools" / "make_sample_data.py"), "--output_dir", str(folder),
                    "--per_frame", *size], check=True, stdout=subprocess.DEVNULL)
    return str(folder)


def table(seconds: dict[str, float], epochs: int, wall: float | None) -> str:
    rows, covered = [], sum(seconds.values())
    total = wall if wall is not None else covered
    if wall is not None:
        seconds = {**seconds, "start-up and the rest": max(0.0, wall - covered)}
    for name, value in seconds.items():
        rows.append([name, f"{value:.1f}", f"{value / max(epochs, 1):.2f}", f"{100 * value / total:.0f} %"])
    rows.append(["total", f"{total:.1f}", f"{total / max(epochs, 1):.2f}", "100 %"])
    return common.markdown_table(["phase", "seconds", "per epoch", "share"], rows)


def main(args) -> int:
    wall = None
    if args.log:
        log = pathlib.Path(args.log)
    else:
        common.print_machine("cpu")
        work = pathlib.Path(tempfile.mkdtemp(prefix="star_bench_epoch_"))
        if args.quick:
            args.input_dir, args.epochs = make_sample_data(work / "data", "--num_videos", "8", "--num_frames", "40"), 1
        elif args.sample and not args.input_dir:
            args.input_dir = make_sample_data(work / "data")
        if not args.input_dir:
            raise SystemExit("--input_dir DATASET (or --log train.log, or --quick)")
        wall = run_main(args, work / "run")
        log = work / "run" / "train.log"
    seconds, epochs, precision, logged = read_log(log)
    print(f"{log}: {epochs} epochs, precision {precision}, " + (f"{wall:.0f} s wall" if wall else
                                                                f"{logged:.0f} s logged (wall time less start-up)") + "\n")
    print(table(seconds, epochs, wall or logged))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
