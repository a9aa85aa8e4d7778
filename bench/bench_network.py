#!/usr/bin/env python
"""The STAR network alone at the published size (16x224x224, random weights): seconds per clip.

    python bench/bench_network.py                      # the full measurement (several minutes)
    python bench/bench_network.py --quick              # tiny sizes, to check the script works
    python bench/bench_network.py --device cuda        # fp32 vs fp16 autocast on a GPU

Each variant ``dtype[+option...][:batch]`` (``fp32``, ``bf16``, ``fp16``; options ``cl`` =
channels_last_3d, ``fold`` = BatchNorm folded into the convs, ``compile`` = torch.compile) runs in
its own child process, so its peak RSS is its own: warm-up forward passes, then the median of
``--repeats`` timed ones under ``torch.inference_mode``. The parent measures the machine's fp32 and
bf16 (fp16 on CUDA) matmul peaks in the same run, counts the network's FLOPs once with
``torch.utils.flop_counter``, and prints one markdown table: seconds per clip, clips/s, achieved
GFLOP/s and its fraction of the measured peaks, time over the compute bound, peak RSS, and the
agreement of each variant with plain fp32 on the same input (same top class, max |box difference|).
"""
from __future__ import annotations

import argparse
import sys

from bench import common

PUBLISHED_GFLOP = 325.0    # DESIGN.md: the network at 16x224x224, per clip
TARGET_X_BOUND = 1.5       # issue 7: the fast path within 1.5x of the compute bound
BOX_TOLERANCE = 0.02       # issue 7: boxes of the fast path within 0.02 of fp32
# Emulated bf16 is ~10-25x slower than fp32 (one pass at 16x224 takes minutes), so without native bf16
# it is measured once, plain; with native bf16 it is the fast path and gets the layout options.
DEFAULT_VARIANTS = {
    "cpu": "fp32 fp32+cl fp32+fold fp32+fold+cl fp32+fold+cl:2 fp32+compile bf16",
    "cpu-native-bf16": "fp32 fp32+fold+cl fp32+compile bf16 bf16+cl bf16+fold+cl bf16+fold+cl:2 bf16+fold+cl+compile",
    "cuda": "fp32 fp16 fp16+cl fp16:4 fp16+cl:4 fp16+cl:8",
}


def default_variants(device: str) -> list[common.Variant]:
    """The variants measured when ``--variants`` is not given."""
    key = "cpu-native-bf16" if device == "cpu" and common.native_bf16() else device
    return [common.parse_variant(v) for v in DEFAULT_VARIANTS[key].split()]


def get_args_parser() -> argparse.ArgumentParser:
    p = common.network_parser(
        __doc__, "forward pass", "forward passes", frames=16, size=224, batch_size=1,
        variants_help="what to measure, each dtype[+option...][:batch]; dtypes fp32 bf16 fp16, options cl "
                      "(channels_last_3d), fold (BatchNorm folded), compile (torch.compile); "
                      f"default on cpu: {DEFAULT_VARIANTS['cpu']}; on a cpu with native bf16: "
                      f"{DEFAULT_VARIANTS['cpu-native-bf16']}; on cuda: {DEFAULT_VARIANTS['cuda']} "
                      "(the first forward pass is timed apart; warm-up at least 1)")
    p.add_argument("--matmul_size", type=int, default=None,
                   help="n of the n x n matmul that measures the peaks (default: 2048 on cpu, 8192 on cuda)")
    p.add_argument("--model_path", default=None,
                   help="a STAR checkpoint to use instead of random weights (e.g. the published best_model.pth)")
    p.add_argument("--num_classes", type=int, default=2, help="foreground classes of the random-weights network")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the random input clip")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds one variant (child process) may take, torch.compile included; past it: n/a")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 4x32x32 clips, 1 timed run, 512 matmul, no torch.compile")
    p.add_argument("--variant", type=common.parse_variant, default=None,
                   help=argparse.SUPPRESS)   # internal: this process is the child measuring one variant
    p.add_argument("--count_flops", action="store_true", help=argparse.SUPPRESS)   # internal, with --variant
    return p


# --------------------------------------------------------------------------- child: one variant


def make_model(args):
    """The network in eval mode: ``--model_path`` or random weights seeded by ``--seed``."""
    import torch
    import checkpoint
    import model as star_model
    if args.model_path:
        return checkpoint.load_checkpoint(args.model_path)[0]
    torch.manual_seed(args.seed)
    return star_model.STAR(args.num_classes).eval()


def make_input(args, batch: int):
    """A random preprocessed clip ``(B, T, 3, S, S)``; every sample is the same clip, so sample 0
    is comparable across batch sizes."""
    import torch
    gen = torch.Generator().manual_seed(args.seed + 1)
    clip = torch.randn(1, args.frames, 3, args.size, args.size, generator=gen)
    return clip.expand(batch, -1, -1, -1, -1).contiguous()


def prepare(args, variant: common.Variant):
    """Model and input of one variant, on its device, with its options applied."""
    import model_setup
    net = make_model(args)
    x = make_input(args, variant.batch or args.batch_size)
    if "fold" in variant.options:
        model_setup.fold_batchnorm(net)
    if "cl" in variant.options:   # as test.py: the input is converted inside forward
        net.use_channels_last()
    return net.to(args.device), x.to(args.device)


def run_variant(args) -> dict:
    """Measure one variant in this process; returns the figures for the parent."""
    import time

    import torch
    variant = args.variant
    net, x = prepare(args, variant)
    result = {"variant": variant.name, "batch": x.shape[0]}
    if args.count_flops:   # before compiling: the counter sees the plain modules
        result["flops_per_clip"] = common.count_flops(net, x[:1])
    if "compile" in variant.options:
        net = torch.compile(net)

    def forward():
        with torch.inference_mode(), common.autocast(args.device, variant.dtype):
            return net(x)

    start = time.perf_counter()
    sync = common.sync_for(args.device)
    out = forward()   # the first call compiles (torch.compile) and warms the allocator
    if sync:
        sync()
    result["first_call_s"] = time.perf_counter() - start
    result["times"] = common.time_runs(forward, max(args.warmup - 1, 0), args.repeats, sync)
    result["logits"] = out["pred_logits"][0].float().cpu().tolist()
    result["boxes"] = out["pred_boxes"][0].float().cpu().tolist()
    result["self_rss_mb"] = common.self_peak_rss_mb()
    if args.device == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def child_main(args) -> int:
    """Run one variant; any failure becomes an ``error`` entry (a table row), not a crash of the bench."""
    try:
        result = run_variant(args)
    except Exception as err:   # noqa: BLE001 - e.g. torch.compile's many backend errors: report, don't die
        common.write_result({"variant": args.variant.name, "error": common.one_line(err)})
        raise
    common.write_result(result)
    return 0


# --------------------------------------------------------------------------- parent


def child_argv(args, variant: common.Variant, count_flops: bool) -> list[str]:
    """The command line that measures ``variant`` in a child process."""
    argv = ["--variant", variant.name, "--device", args.device, "--frames", str(args.frames),
            "--size", str(args.size), "--batch_size", str(args.batch_size), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--num_classes", str(args.num_classes), "--seed", str(args.seed)]
    if args.model_path:
        argv += ["--model_path", args.model_path]
    if count_flops:
        argv.append("--count_flops")
    return common.child_cmd(__file__, argv)


def apply_quick(args) -> None:
    """Tiny sizes so the whole script runs in well under a minute (figures are meaningless)."""
    args.frames, args.size, args.warmup, args.repeats, args.matmul_size = 4, 32, 1, 1, 512
    if args.variants is None:
        args.variants = [common.parse_variant(v) for v in "fp32 fp32+fold+cl fp32+fold+cl:2 bf16".split()]


def measure_peaks(args) -> dict:
    """Matmul GFLOP/s per dtype in this run: fp32 and bf16 (and fp16 on CUDA)."""
    names = ("fp32", "bf16", "fp16") if args.device == "cuda" else ("fp32", "bf16")
    reps = 1 if args.quick else 5
    return {n: common.matmul_gflops(n, args.matmul_size, args.device, repeats=reps) for n in names}


def top_prediction(logits, boxes):
    """The video-level prediction: the query with the best foreground probability, its class, its box."""
    import torch
    probs = torch.tensor(logits).softmax(-1)[:, :-1]
    score, cls = probs.max(-1)
    q = int(score.argmax())
    return q, int(cls[q]), boxes[q]


def agreement(ref: dict, res: dict) -> tuple[str, str, float]:
    """(same top query and class as fp32?, queries whose arg-max class agrees, max |box difference|)."""
    import torch
    q_ref, c_ref, _ = top_prediction(ref["logits"], ref["boxes"])
    q, c, _ = top_prediction(res["logits"], res["boxes"])
    same_top = "yes" if (q, c) == (q_ref, c_ref) else f"no (q{q} c{c} vs q{q_ref} c{c_ref})"
    arg_ref = torch.tensor(ref["logits"]).argmax(-1)
    arg = torch.tensor(res["logits"]).argmax(-1)
    box_diff = float((torch.tensor(res["boxes"]) - torch.tensor(ref["boxes"])).abs().max())
    return same_top, f"{int((arg == arg_ref).sum())}/{len(arg)}", box_diff


def run_variants(args) -> tuple[list, dict]:
    """Each variant in its own child; the first is plain fp32 (the reference, also counts FLOPs)."""
    reference = common.Variant("fp32")
    variants = [reference] + [v for v in args.variants if v != reference]
    runs = []
    for i, variant in enumerate(variants):
        print(f"--- {variant.name}", flush=True)
        run = common.run_child(child_argv(args, variant, count_flops=i == 0), timeout=args.timeout)
        runs.append((variant, run))
    ref = runs[0][1].result if runs[0][1].returncode == 0 else None
    return runs, ref


def row_for(args, variant, run, ref, flops, peaks) -> list:
    """One table row; a failed or timed-out variant gets n/a and its reason."""
    label = "+".join([common.dtype_label(variant.dtype, args.device), *variant.options])
    batch = variant.batch or args.batch_size
    res = run.result or {}
    why = common.failure(run)
    if why:
        return [label, batch] + ["n/a"] * (len(HEADERS) - 3) + [why]
    per_clip = common.median(res["times"]) / res["batch"]
    gflops = flops / per_clip / 1e9 if flops else float("nan")
    same_top, argmax, box_diff = agreement(ref, res) if ref else ("n/a", "n/a", float("nan"))
    notes = [f"first call {res['first_call_s']:.1f} s"] if "compile" in variant.options else []
    if "gpu_peak_mb" in res:
        notes.append(f"GPU memory {res['gpu_peak_mb']:.0f} MB")
    box_ok = "ok" if box_diff <= BOX_TOLERANCE else "OVER"
    return [label, batch, f"{per_clip:.3f}", f"{1 / per_clip:.2f}", common.spread(res["times"]), common.num(gflops),
            f"{common.num(100 * gflops / peaks['fp32'])}%", f"{common.num(100 * gflops / peaks['bf16'])}%",
            f"{per_clip / bound_seconds(flops, peaks):.2f}x", f"{run.peak_rss_mb:.0f}", same_top, argmax,
            f"{box_diff:.4f} {box_ok}", "; ".join(notes)]


HEADERS = ["variant", "batch", "s/clip", "clips/s", "s/clip min-max", "GFLOP/s", "of fp32 peak", "of bf16 peak",
           "x bound", "peak RSS MB", "top class = fp32", "argmax = fp32", f"max abs box diff (tol {BOX_TOLERANCE})",
           "note"]


def bound_seconds(flops: float, peaks: dict) -> float:
    """The compute bound per clip: FLOPs at the best matmul peak measured in this run. (The issue
    defines it on the bf16 peak; where bf16 is emulated that peak is far below fp32's, and the fast
    path is fp32, so the best peak is the honest roof.)"""
    return flops / max(peaks.values()) / 1e9


def print_summary(args, rows, flops, peaks) -> None:
    """The compute bound, the best variant, and how far from the bound and the target it is."""
    gflop = flops / 1e9
    print(f"\nFLOPs per clip at {args.frames}x{args.size}x{args.size}: {gflop:.1f} GFLOP counted by "
          f"torch.utils.flop_counter (DESIGN.md: {PUBLISHED_GFLOP:.0f} GFLOP at 16x224x224)")
    print("matmul peaks measured in this run (n = %d): " % args.matmul_size
          + ", ".join(f"{common.dtype_label(k, args.device)} {common.num(v)} GFLOP/s" for k, v in peaks.items()))
    best_name = max(peaks, key=peaks.get)
    print(f"compute bound per clip: {gflop / peaks[best_name]:.3f} s at the best peak ({best_name}; 'x bound' column); "
          f"{gflop / peaks['bf16']:.3f} s at the bf16 peak (the issue's definition)")
    if args.device == "cpu" and not common.native_bf16():
        print("note: bf16 is emulated on this CPU, so its 'peak' is no roof: "
              "the bound and the verdict use the best peak")
    timed = [r for r in rows if r[2] != "n/a"]
    if not timed:
        return
    best = min(timed, key=lambda r: float(r[2]))
    x_bound = float(best[2]) / bound_seconds(flops, peaks)
    verdict = "met" if x_bound <= TARGET_X_BOUND else "not met"
    print(f"fastest: {best[0]} batch {best[1]}: {best[2]} s per clip, {best[3]} clips/s = {x_bound:.2f}x the compute "
          f"bound (target <= {TARGET_X_BOUND}x: {verdict}); agreement with fp32: top class {best[10]}, "
          f"max abs box diff {best[12]}")


def main(args) -> int:
    if args.variant is not None:
        return child_main(args)
    if args.quick:
        apply_quick(args)
    args.variants = args.variants or default_variants(args.device)
    args.matmul_size = args.matmul_size or (8192 if args.device == "cuda" else 2048)
    print(f"# STAR network, {args.frames}x{args.size}x{args.size}, {args.device}, "
          f"warm-up {args.warmup}, median of {args.repeats}" + (" (QUICK: figures meaningless)" if args.quick else ""))
    common.print_machine(args.device)
    peaks = measure_peaks(args)
    runs, ref = run_variants(args)
    flops = (ref or {}).get("flops_per_clip", 0)
    rows = [row_for(args, v, run, ref, flops, peaks) for v, run in runs]
    print()
    print(common.markdown_table(HEADERS, rows))
    if flops:
        print_summary(args, rows, flops, peaks)
    return 0 if ref else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
