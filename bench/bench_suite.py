#!/usr/bin/env python
"""The dataset suite benchmark: the tester's command on every variant of tools/make_suite_data.py, one table.

    python bench/bench_suite.py                      # every variant but the two held out (hours on 2 cores)
    python bench/bench_suite.py --quick              # the cheaper schedule, for ranking choices
    python bench/bench_suite.py --variants people_base small_actors --main_args "--pair_prob 0"
    python bench/bench_suite.py --held_out           # with the held-out variants: only at the very end
    python bench/bench_suite.py --quick --variants people_base --num_videos 12 --num_unseen 6   # a smoke test

Per variant: the data is made if absent (make_suite_data.make_variant into --data_dir/<variant>/{train,unseen}); main.py
trains with the tester's command (--epochs 30 --batch_size 4 --num_frames 8 --img_size 112 --pretrained none
--workers 1; --quick adds --epochs 6 --decoder_steps 60; --main_args comes last and wins); test.py --labels scores the
unseen set at --score_threshold 0.05 (as issue 35's tester did; --no_annotate: no annotated videos are written); and
test.py --labels runs again on the multi-actor unseen videos alone (labels of 2+ tracks; a folder of symlinks with a
filtered action_challenge.csv, scored against the whole unseen set's labels so the class map is the same): test.py's
report has no such subset, and its frame-mAP ranks every query unthresholded, which predictions_frames.csv (tubes
above the threshold) cannot give. Each child's output goes to --work_dir/<variant>/{train,test,multi}.out, main.py's
run to <variant>/run/; a stage whose output exists (best_model.pth of a run that exited 0, then
<variant>/unseen_metrics.json, <variant>/multi_actor_metrics.json) is reused unless --fresh, so an interrupted suite
resumes where it stopped (a folder made with other settings is refused, not mixed). A variant that fails is a row
saying so with its log, and the others go on. Printed: the machine, the table, the exact commands; --json: all of it.

Columns: frame-mAP@0.5, video-mAP@0.2, video-mAP@0.5 (test.py's YOWOv2 conventions, VOC all-point AP, mean over the
classes with ground truth); worst class: the lowest per-class frame-AP@0.5; per-class frame-AP@0.5; multi-actor
videos: how many unseen videos have 2+ acting actors, and their frame-mAP@0.5 and video-mAP@0.5 alone; train min:
main.py's wall minutes; test min: both test.py runs' wall minutes. Rows "mean" (per class: the mean by class name)
and "worst" (lowest figure, highest minutes) are over the variants not held out that finished; the held-out
variants come in a table of their own.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import shlex
import shutil
import sys

import video
from bench import common
from tools import make_suite_data as suite

ROOT = common.ROOT
TESTER = ["--epochs", "30", "--batch_size", "4", "--num_frames", "8", "--img_size", "112", "--pretrained", "none",
          "--workers", "1"]
QUICK = ["--epochs", "6", "--decoder_steps", "60"]
TEST = ["--score_threshold", "0.05", "--no_annotate"]
MAPS = ("frame_map50", "video_map20", "video_map50")
HEADERS = ["variant", "frame-mAP@0.5", "video-mAP@0.2", "video-mAP@0.5", "worst class (frame-AP@0.5)",
           "per-class frame-AP@0.5", "multi-actor videos", "multi-actor frame-mAP@0.5", "multi-actor video-mAP@0.5",
           "train min", "test min", "note"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["all"],
                   help=f"all, or names (spaces or commas): {', '.join(suite.SUITE)}")
    p.add_argument("--held_out", action="store_true",
                   help="also run the held-out variants (excluded otherwise: kept out of every choice until the end)")
    p.add_argument("--data_dir", default="runs/suite_data", help="where the suite's data is made (or found)")
    p.add_argument("--num_videos", type=int, default=None, help="training videos per variant (default: its own, 72)")
    p.add_argument("--num_unseen", type=int, default=None, help="unseen videos per variant (default: its own, 24)")
    p.add_argument("--seed", type=int, default=0, help="the suite's seed (the data is a function of it)")
    p.add_argument("--media_dir", default=str(suite.MEDIA_DIR), help="footage for the real_background variant")
    p.add_argument("--work_dir", default=None,
                   help="per-variant outputs (default: runs/suite, with --quick runs/suite_quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"the cheaper schedule for decisions: main.py {' '.join(QUICK)} (labelled QUICK)")
    p.add_argument("--main_args", default="",
                   help='more main.py flags, after the schedule\'s (they win), e.g. "--epochs 10 --pair_prob 0"')
    p.add_argument("--test_args", default="", help="more test.py flags, after --score_threshold 0.05 --no_annotate")
    p.add_argument("--fresh", action="store_true",
                   help="remove each selected variant's work folder first (not its data): run everything again")
    p.add_argument("--timeout_min", type=float, default=0, help="kill a child running longer than this (0: never)")
    p.add_argument("--json", default=None, help="write the results here (default: WORK_DIR/suite.json)")
    return p


def select_variants(words: list[str], held_out: bool) -> tuple[list[str], list[str]]:
    """``(to run, held out and left out)``; SystemExit on an unknown name."""
    names = [n.strip() for w in words for n in w.split(",") if n.strip()]
    names = list(suite.SUITE) if names == ["all"] else names
    unknown = [n for n in names if n not in suite.SUITE]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(suite.SUITE)}")
    return [n for n in names if held_out or not suite.SUITE[n].held_out], \
        [n for n in names if not held_out and suite.SUITE[n].held_out]


def schedule(args) -> list[str]:
    return TESTER + (QUICK if args.quick else []) + shlex.split(args.main_args)


def train_cmd(args, data: pathlib.Path, run: pathlib.Path) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--input_dir", str(data / "train"), "--output_dir", str(run),
            "--overwrite", *schedule(args)]


def test_cmd(args, videos: pathlib.Path, labels: pathlib.Path, model: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [sys.executable, str(ROOT / "test.py"), "--input_dir", str(videos), "--labels", str(labels),
            "--model_path", str(model), "--output_file", str(out), *TEST, *shlex.split(args.test_args)]


def run_logged(cmd: list[str], log: pathlib.Path, timeout: float | None) -> common.ChildRun:
    """``cmd`` as a child (common.run_child: timed, its own process group), stdout and stderr into ``log``."""
    return common.run_child(["sh", "-c", 'exec "$0" "$@" > "$STAR_SUITE_LOG" 2>&1', *cmd], timeout=timeout,
                            env={"STAR_SUITE_LOG": str(log)})


def sizes(args, name: str) -> dict:
    v = suite.SUITE[name]
    return {"train": v.num_videos if args.num_videos is None else args.num_videos,
            "unseen": v.num_unseen if args.num_unseen is None else args.num_unseen}


def ensure_data(args, name: str) -> tuple[pathlib.Path, str]:
    """The variant's data folder, made if absent (make_suite_data's API); with the command that makes the same."""
    folder, want = pathlib.Path(args.data_dir) / name, sizes(args, name)
    cmd = (f"python tools/make_suite_data.py --output_dir {args.data_dir} --variants {name} --num_videos "
           f"{want['train']} --num_unseen {want['unseen']} --seed {args.seed} --media_dir {args.media_dir}")
    if (folder / "variant.json").is_file():   # written last by make_variant: the data is complete
        made = json.loads((folder / "variant.json").read_text())
        have = {k: s["videos"] for k, s in made.get("sets", {}).items()}
        if made.get("seed") != args.seed or have != want:
            raise ValueError(f"{folder} holds seed {made.get('seed')} {have}, not seed {args.seed} {want}: "
                             "another --data_dir, or remove it")
        return folder, f"{cmd}  (reused: {folder} exists)"
    suite.make_variant(name, suite.SUITE[name], args.data_dir, args.seed, want["train"], want["unseen"], args.media_dir)
    return folder, f"{cmd}  (run through its Python API)"


def multi_actor_rows(dataset_dir: pathlib.Path) -> list[tuple[str, str]]:
    """``(video, label file)`` CSV rows whose per-frame labels name 2+ tracks (actors acting in the video)."""
    rows = []
    for row in list(csv.reader((dataset_dir / "action_challenge.csv").read_text().splitlines()))[1:]:
        if len(row) >= 2 and row[1].strip():
            lines = (dataset_dir / row[1].strip()).read_text().splitlines()
            if len({ln.split()[1] for ln in lines if len(ln.split()) == 7 and not ln.startswith("#")}) >= 2:
                rows.append((row[0].strip(), row[1].strip()))
    return rows


def make_multi_actor_subset(dataset_dir: pathlib.Path, subset: pathlib.Path) -> list[str]:
    """``subset``: symlinks to the multi-actor videos and labels of ``dataset_dir``, a filtered CSV, classes.txt."""
    rows = multi_actor_rows(dataset_dir)
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    for name in [n for row in rows for n in row] + [n for n in ("classes.txt",) if (dataset_dir / n).exists()]:
        (subset / name).symlink_to((dataset_dir / name).resolve())
    with (subset / "action_challenge.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("video_file", "label_file"), *rows])
    return [video for video, _ in rows]


def worst_class(per_class: dict) -> tuple[str, float] | None:
    known = [(ap, name) for name, ap in per_class.items() if _ok(ap)]
    return (min(known)[1], min(known)[0]) if known else None


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def run_variant(args, name: str) -> dict:
    """Make, train, test and test the multi-actor subset of one variant (each stage reused when done); its row."""
    v, vdir = suite.SUITE[name], pathlib.Path(args.work_dir) / name
    res = {"variant": name, "held_out": v.held_out, "status": "ok", "note": "", "commands": []}
    settings = {"schedule": schedule(args), "test": TEST + shlex.split(args.test_args), "seed": args.seed,
                "sizes": sizes(args, name), "data_dir": str(pathlib.Path(args.data_dir).resolve())}
    if args.fresh:
        shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True, exist_ok=True)
    record_path = vdir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("settings", settings) != settings:
        return {**res, "status": "failed", "note": f"{vdir} holds a run with other settings ({record['settings']}): "
                                                   "--fresh or another --work_dir"}
    record["settings"] = settings
    try:
        data, made = ensure_data(args, name)
    except suite.FootageMissing as exc:
        return {**res, "status": "skipped", "note": f"skipped: {exc}"}
    except (ValueError, OSError, video.VideoError) as exc:
        return {**res, "status": "failed", "note": f"FAILED making the data: {exc}"}
    res["commands"].append(made)
    model, unseen, subset = vdir / "run" / "best_model.pth", data / "unseen", vdir / "multi_actor_videos"
    multi = make_multi_actor_subset(unseen, subset)
    stages = [("train", train_cmd(args, data, vdir / "run"), record.get("train", {}).get("returncode") == 0
               and model.is_file(), model),
              ("test", test_cmd(args, unseen, unseen, model, vdir / "unseen.csv"), None, vdir / "unseen_metrics.json"),
              ("multi", test_cmd(args, subset, unseen, model, vdir / "multi_actor.csv"), None,
               vdir / "multi_actor_metrics.json")][:3 if multi else 2]
    ran, reused = [], []
    for key, cmd, done, output in stages:
        log = vdir / f"{key}.out"
        if not ran and (output.is_file() if done is None else done):   # after a stage that ran, every later one runs
            res["commands"].append(f"{shlex.join(cmd)}  (reused: {output} exists)")
            reused.append(key)
            continue
        print(f"{name}: {key} ... (log: {log})", flush=True)
        output.unlink(missing_ok=True)   # an earlier run's figures never pass for this run's
        run = run_logged(cmd, log, args.timeout_min * 60 or None)
        record[key] = {"seconds": run.seconds, "returncode": run.returncode, "command": shlex.join(cmd),
                       "log": str(log)}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        res["commands"].append(f"{shlex.join(cmd)} > {log} 2>&1")
        ran.append(key)
        if run.returncode != 0 or run.timed_out or not output.is_file():
            why = ("timed out" if run.timed_out else f"exit code {run.returncode}" if run.returncode
                   else f"no {output.name}")
            return {**res, "status": "failed", "note": f"FAILED: {key} ({why}), see {log}"}
    seconds = {k: record[k]["seconds"] for k in ("train", "test", "multi") if k in record}
    scores = json.loads((vdir / "unseen_metrics.json").read_text())
    res.update({k: scores.get(k) for k in MAPS}, frame_ap50=scores.get("frame_ap50") or {}, multi_videos=len(multi),
               train_min=seconds["train"] / 60 if "train" in seconds else None,
               test_min=sum(seconds.get(k, 0) for k in ("test", "multi")) / 60 if "test" in seconds else None,
               note="reused" if not ran else f"reused {', '.join(reused)}" if reused else "")
    if multi:
        sub = json.loads((vdir / "multi_actor_metrics.json").read_text())
        res.update({f"multi_{k}": sub.get(k) for k in MAPS})
    res["worst_class"] = worst_class(res["frame_ap50"])
    return res


def summarise(results: list[dict]) -> list[dict]:
    """The mean and worst rows over the finished variants not held out (none when none finished)."""
    main = [r for r in results if not r["held_out"]]
    ok = [r for r in main if r["status"] == "ok"]
    if not ok:
        return []
    keys = [*MAPS, *(f"multi_{k}" for k in MAPS), "train_min", "test_min"]
    values = {k: [r[k] for r in ok if _ok(r.get(k))] for k in keys}
    classes = {c: [r["frame_ap50"][c] for r in ok if _ok(r["frame_ap50"].get(c))]
               for c in dict.fromkeys(c for r in ok for c in r["frame_ap50"])}
    left = [r["variant"] for r in main if r["status"] != "ok"]
    note = f"{len(ok)} of {len(main)} variants" + (f"; without {', '.join(left)}" if left else "")
    mean = {"variant": "mean", "note": note, "multi_videos": sum(r["multi_videos"] for r in ok) / len(ok),
            "frame_ap50": {c: sum(v) / len(v) if v else None for c, v in classes.items()},
            **{k: sum(v) / len(v) if v else None for k, v in values.items()}}
    mean["worst_class"] = worst_class(mean["frame_ap50"])
    worsts = [(r["worst_class"][1], f"{r['variant']}: {r['worst_class'][0]}") for r in ok if r["worst_class"]]
    worst = {"variant": "worst", "note": note, "multi_videos": min(r["multi_videos"] for r in ok),
             "frame_ap50": {c: min(v) if v else None for c, v in classes.items()},
             **{k: (max(v) if k.endswith("_min") else min(v)) if v else None for k, v in values.items()},
             "worst_class": (min(worsts)[1], min(worsts)[0]) if worsts else None}
    return [mean, worst]


def row_cells(r: dict) -> list:
    if r.get("status", "ok") != "ok":
        return [r["variant"], *["-"] * (len(HEADERS) - 2), r["note"]]
    f = lambda x, d=3: f"{x:.{d}f}" if _ok(x) else "n/a"  # noqa: E731
    n = r["multi_videos"]
    return [r["variant"], *(f(r[k]) for k in MAPS),
            f"{r['worst_class'][0]} {r['worst_class'][1]:.2f}" if r["worst_class"] else "n/a",
            ", ".join(f"{c} {f(ap, 2)}" for c, ap in r["frame_ap50"].items()), f"{n:g}",
            *(f(r[k]) if _ok(r.get(k)) else "-" for k in ("multi_frame_map50", "multi_video_map50")),
            f(r["train_min"], 1), f(r["test_min"], 1), r["note"]]


def report(results: list[dict], args, left_out: list[str]) -> str:
    """The schedule, the table (variants, mean, worst), then the held-out variants' table apart."""
    label = (f"QUICK schedule (main.py {shlex.join(schedule(args))}): for ranking choices, not the tester's figures"
             if args.quick else f"the tester's command (main.py {shlex.join(schedule(args))})")
    lines = [f"## Dataset suite: {label}; test.py {shlex.join(TEST + shlex.split(args.test_args))}", "",
             common.markdown_table(HEADERS, [row_cells(r) for r in results if not r["held_out"]]
                                   + [row_cells(r) for r in summarise(results)])]
    held = [r for r in results if r["held_out"]]
    if held:
        lines += ["", "Held out (kept out of every choice until the end):", "",
                  common.markdown_table(HEADERS, [row_cells(r) for r in held])]
    if left_out:
        lines += ["", f"Held out, not run: {', '.join(left_out)} (--held_out runs them, at the end only)"]
    return "\n".join(lines)


def main(args) -> int:
    args.work_dir = args.work_dir or ("runs/suite_quick" if args.quick else "runs/suite")
    if any(n is not None and n < 1 for n in (args.num_videos, args.num_unseen)):
        raise SystemExit("--num_videos and --num_unseen must be >= 1")
    names, left_out = select_variants(args.variants, args.held_out)
    machine = common.print_machine("cpu")
    if left_out:
        print(f"held out, not run: {', '.join(left_out)} (kept out of every choice until the end; --held_out)\n")
    results = []
    for name in names:
        results.append(run_variant(args, name))
        print(f"{name}: {results[-1]['status']} {results[-1]['note']}".rstrip(), flush=True)
    print("\n" + report(results, args, left_out) + "\n\nCommands run:")
    print("\n".join(f"    {c}" for r in results for c in r["commands"]))
    path = pathlib.Path(args.json or pathlib.Path(args.work_dir) / "suite.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    path.write_text(json.dumps({"machine": machine, "quick": args.quick, "schedule": schedule(args),
                                "test": TEST + shlex.split(args.test_args), "variants": results, "held_out_not_run":
                                left_out, **dict(zip(("mean", "worst"), summary))}, indent=1) + "\n")
    print(f"\nresults written to {path}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
