#!/usr/bin/env python
"""Training throughput: samples/s of full train steps at 8x112, batch 4, fp32 vs low-precision autocast.

    python bench/bench_training.py                   # the full measurement
    python bench/bench_training.py --quick           # tiny sizes, 1 timed step: checks the script
    python bench/bench_training.py --device cuda     # fp32 vs fp16 autocast + GradScaler

A step is what ``main.py`` does per batch: forward (autocast when the variant says so), the set criterion
(Hungarian matching, CE + L1 + GIoU with auxiliary losses, in fp32), backward, gradient clipping, and an
AdamW step that is skipped when the gradient norm is not finite. The data is one random batch
(random clips, one random box per video) reused every step, so decoding is not measured. Each variant
(``fp32``, ``bf16``, ``fp16``, option ``cl`` = channels_last_3d) runs in its own child process:
warm-up steps, then the median of ``--repeats`` timed steps; its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import sys

from bench import common

TARGET_SPEEDUP = 1.7   # issue 7: bf16 training at least 1.7x the fp32 samples/s
DEFAULT_VARIANTS = {"cpu": "fp32 bf16", "cuda": "fp32 fp16 fp16+cl"}


def get_args_parser() -> argparse.ArgumentParser:
    p = common.network_parser(
        __doc__, "train step", "train steps", frames=8, size=112, batch_size=4,
        variants_help="what to measure, each dtype[+cl][:batch] (dtypes fp32 bf16 fp16; cl = channels_last_3d); "
                      f"default on cpu: {DEFAULT_VARIANTS['cpu']}; on cuda: {DEFAULT_VARIANTS['cuda']}")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--grad_clip", type=float, default=0.5, help="max gradient norm, as main.py (0 = none)")
    p.add_argument("--num_classes", type=int, default=2, help="foreground classes")
    p.add_argument("--freeze_trunk", type=int, default=0, choices=range(0, 6), metavar="{0..5}",
                   help="first N trunk stages without gradients, as main.py --freeze_trunk (from scratch it freezes 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batch")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one variant (child process) may take")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2x32x32 clips, batch 2, 1 timed step")
    p.add_argument("--variant", type=common.parse_variant, default=None,
                   help=argparse.SUPPRESS)   # internal: this process is the child measuring one variant
    return p


# --------------------------------------------------------------------------- child: one variant


def random_batch(args, batch: int, device):
    """Random preprocessed clips ``(B, T, 3, S, S)`` and one random box (cxcywh) and class per video."""
    import torch
    gen = torch.Generator().manual_seed(args.seed + 1)
    clips = torch.randn(batch, args.frames, 3, args.size, args.size, generator=gen)
    targets = []
    for _ in range(batch):
        wh = 0.2 + 0.4 * torch.rand(1, 2, generator=gen)
        centre = wh / 2 + (1 - wh) * torch.rand(1, 2, generator=gen)
        targets.append({"labels": torch.randint(0, args.num_classes, (1,), generator=gen).to(device),
                        "boxes": torch.cat([centre, wh], 1).to(device)})
    return clips.to(device), targets


def make_step(args, variant: common.Variant):
    """A closure doing one train step; it returns (loss, skipped?)."""
    import torch
    from losses import build_criterion
    from model_setup import build_model, freeze_trunk_stages
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.num_classes, pretrained="none").to(device).train()
    freeze_trunk_stages(model, args.freeze_trunk)
    criterion = build_criterion(args.num_classes).to(device)
    clips, targets = random_batch(args, variant.batch or args.batch_size, device)
    if "cl" in variant.options:
        model.use_channels_last()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-4)
    dtype = common.torch_dtype(variant.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with common.autocast(args.device, variant.dtype):
            outputs = model(clips)
        loss = criterion.total(criterion(outputs, targets))   # the criterion itself runs in fp32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trained, args.grad_clip or float("inf"))
        finite = bool(torch.isfinite(norm))
        if finite or scaler.is_enabled():
            scaler.step(optimizer)   # GradScaler skips a non-finite step itself
        scaler.update()
        return float(loss.detach()), not finite

    return step


def run_variant(args) -> dict:
    """Measure one variant in this process; returns the figures for the parent."""
    variant = args.variant
    step = make_step(args, variant)
    log = []
    times = common.time_runs(lambda: log.append(step()), args.warmup, args.repeats, common.sync_for(args.device))
    result = {"variant": variant.name, "batch": variant.batch or args.batch_size, "times": times,
              "final_loss": log[-1][0], "skipped": sum(s for _, s in log), "steps": len(log)}
    if args.device == "cuda":
        import torch
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def child_main(args) -> int:
    """Run one variant; a failure becomes an ``error`` entry (a table row) before it propagates."""
    try:
        result = run_variant(args)
    except Exception as err:   # noqa: BLE001 - any failure of one variant is reported in its row
        common.write_result({"variant": args.variant.name, "error": common.one_line(err)})
        raise
    common.write_result(result)
    return 0


# --------------------------------------------------------------------------- parent


def child_argv(args, variant: common.Variant) -> list[str]:
    argv = ["--variant", variant.name, "--device", args.device, "--frames", str(args.frames), "--size", str(args.size),
            "--batch_size", str(args.batch_size), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--lr", str(args.lr), "--grad_clip", str(args.grad_clip), "--num_classes", str(args.num_classes),
            "--seed", str(args.seed), "--freeze_trunk", str(args.freeze_trunk)]
    return common.child_cmd(__file__, argv)


def row_for(args, variant, run, base_rate) -> list:
    """One table row; a failed or timed-out variant gets n/a and its reason."""
    label = "+".join([common.dtype_label(variant.dtype, args.device), *variant.options])
    res = run.result or {}
    batch = variant.batch or args.batch_size
    why = common.failure(run)
    if why:
        return [label, batch, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", why]
    t = common.median(res["times"])
    rate = res["batch"] / t
    speedup = f"{rate / base_rate:.2f}x" if base_rate else "n/a"
    note = f"GPU memory {res['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in res else ""
    return [label, batch, f"{t:.2f}", f"{rate:.2f}", speedup, f"{run.peak_rss_mb:.0f}",
            f"{res['skipped']}/{res['steps']}", f"{res['final_loss']:.3f}", note]


def main(args) -> int:
    if args.variant is not None:
        return child_main(args)
    if args.quick:
        args.frames, args.size, args.batch_size, args.warmup, args.repeats = 2, 32, 2, 1, 1
    variants = args.variants or [common.parse_variant(v) for v in DEFAULT_VARIANTS[args.device].split()]
    reference = common.Variant("fp32")
    variants = [reference] + [v for v in variants if v != reference]
    print(f"# STAR training steps, {args.frames}x{args.size}x{args.size}, batch {args.batch_size}, {args.device}, "
          f"{args.freeze_trunk} trunk stages frozen, "
          f"warm-up {args.warmup}, median of {args.repeats}" + (" (QUICK: figures meaningless)" if args.quick else ""))
    common.print_machine(args.device)
    runs = []
    for variant in variants:
        print(f"--- {variant.name}", flush=True)
        runs.append((variant, common.run_child(child_argv(args, variant), timeout=args.timeout)))
    ref = runs[0][1].result or {}
    base_rate = ref["batch"] / common.median(ref["times"]) if "times" in ref else None
    rows = [row_for(args, v, run, base_rate) for v, run in runs]
    print()
    print(common.markdown_table(["variant", "batch", "s/step", "samples/s", "vs fp32", "peak RSS MB",
                                 "skipped steps", "last loss", "note"], rows))
    low = [r for r in rows[1:] if r[4] != "n/a" and r[0].split("+")[0].split()[0] in ("bf16", "fp16")]
    unusable = [r[0] for r in low if r[6].split("/")[0] == r[6].split("/")[1]]
    if unusable:   # every step skipped: fast, but it learns nothing (main.py trains in fp32 there)
        print(f"\nevery step skipped (non-finite gradients), not counted: {', '.join(unusable)}")
    low = [r for r in low if r[0] not in unusable]
    if low:
        best = max(low, key=lambda r: float(r[4].rstrip("x")))
        verdict = "met" if float(best[4].rstrip("x")) >= TARGET_SPEEDUP else "not met"
        print(f"\nbest low precision: {best[0]}: {best[4]} the fp32 samples/s (target >= {TARGET_SPEEDUP}x: {verdict})")
    if args.device == "cpu" and not common.native_bf16():
        print("note: this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 autocast is emulated and slower than fp32")
    return 0 if base_rate else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
