#!/usr/bin/env python
"""Deployment backends side by side: PyTorch fp32, PyTorch bf16 (where the CPU has it natively),
onnxruntime fp32 and onnxruntime int8, at 8x112 and 16x224: seconds per clip and agreement with fp32.

    python bench/bench_deploy.py                       # both sizes, 8 clips each (~2-3 min on a quiet 2-core CPU)
    python bench/bench_deploy.py --sizes 16x224 --clips 32
    python bench/bench_deploy.py --model_path best_model.pth   # trained weights instead of random ones
    python bench/bench_deploy.py --quick               # tiny sizes, to check the script works

The network is STAR(num_classes=2) with the default (published) size and random weights, prepared as
test.py runs it (BatchNorm folded, channels_last_3d), exported and quantised exactly as export.py does
(one graph, static int8 QDQ per-channel on the Conv layers). The clips are windows of the real videos in
``--media`` (default ../shared/media) when it has any, else random; the int8 calibration uses other
windows than the measured ones. Every variant runs every clip once, batch 1, after one untimed call;
the table shows the median seconds per clip (min-max beside it) and, against PyTorch fp32 on the same
clips, the largest difference of class probabilities and boxes and the share of clips whose top class
(the best query's foreground class) is the same.

Goals (issue 22): onnxruntime int8 at least 2x PyTorch fp32 on a CPU without native bf16, and the same
top class on at least 98 % of clips. Random weights give near-tied classes, which makes the agreement a
harsher test than a trained model's; use ``--model_path`` for the real figure.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

import backend
import checkpoint
import export
import model as star_model
import model_setup
from bench import common
from model_description import ModelDescription

MEDIA = common.ROOT.parent / "shared" / "media"
INT8_GOAL_X = 2.0          # onnxruntime int8 vs PyTorch fp32, on a CPU without native bf16
AGREEMENT_GOAL = 0.98      # share of clips with PyTorch fp32's top class


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=[(8, 112), (16, 224)], type=parse_size,
                   help="clip sizes TxS to measure (T frames of S x S); default 8x112 16x224")
    p.add_argument("--clips", type=int, default=8, help="clips measured per size (each variant runs each once)")
    p.add_argument("--calibration_clips", type=int, default=8, help="clips that calibrate the int8 model")
    p.add_argument("--media", default=str(MEDIA), help="folder of real videos for the clips (random clips when absent)")
    p.add_argument("--model_path", default=None, help="a STAR checkpoint instead of random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and random clips")
    p.add_argument("--quick", action="store_true", help="a smoke test: 4x32 clips, 2 of them; figures meaningless")
    return p


def parse_size(text: str) -> tuple[int, int]:
    """``"16x224"`` -> ``(16, 224)``."""
    try:
        frames, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected TxS, e.g. 16x224") from None
    return frames, size


# --------------------------------------------------------------------------- inputs


def network(args) -> tuple[star_model.STAR, ModelDescription]:
    """The prepared PyTorch network and its description (class names, model_args, mean/std)."""
    if args.model_path:
        net, info = checkpoint.load_checkpoint(args.model_path)
    else:
        torch.manual_seed(args.seed)
        net = star_model.STAR(2).eval()
        info = {"class_names": list(checkpoint.PUBLISHED_CLASS_NAMES), "model_args": checkpoint.model_args_from(2),
                **checkpoint.PUBLISHED_PREPROCESSING, "source": "random weights"}
    return model_setup.prepare_for_inference(net), ModelDescription.from_info(info)


def clips_for(args, desc: ModelDescription) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """``(measured clips, calibration clips, where from)``; each clip ``(T, 3, S, S)``. Real windows
    alternate between the two sets, so int8 is never measured on the clips it was calibrated on."""
    media = Path(args.media)
    if media.is_dir() and export.video_files(media):
        clips = export.clips_from_videos(media, args.clips + args.calibration_clips, desc)
        measured, calib = clips[0::2], clips[1::2]
        return measured[:args.clips], calib[:args.calibration_clips], f"{len(measured[:args.clips])} windows of {media}"
    measured = export.random_clips(args.clips, desc, args.seed)
    calib = export.random_clips(args.calibration_clips, desc, args.seed + 1)
    return measured, calib, f"{args.clips} random clips"


# --------------------------------------------------------------------------- variants


def torch_variant(net, clips, dtype) -> tuple[list[dict], list[float]]:
    """PyTorch outputs and seconds per clip, under autocast ``dtype`` (None: fp32)."""
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with context:
        return export.run_torch(net, clips)


def onnx_models(net, desc, calib, folder) -> dict[str, backend.OnnxModel]:
    """The fp32 export and its int8 quantisation (as export.py makes them), loaded with the backend."""
    import onnx
    fp32_path, int8_path = Path(folder) / "star.onnx", Path(folder) / "star.int8.onnx"
    proto = export.export_graph(net, desc, export.DEFAULT_OPSET, "bench")
    export.set_metadata(proto, export.metadata(desc, "fp32", "bench"))
    onnx.save(proto, os.fspath(fp32_path))
    del proto
    start = time.perf_counter()
    export.quantize_int8(fp32_path, int8_path, calib)
    export.write_metadata(int8_path, export.metadata(desc, "int8", "bench"))
    print(f"(int8 calibrated on {len(calib)} clips in {time.perf_counter() - start:.0f} s)")
    return {"fp32": backend.OnnxModel(fp32_path), "int8": backend.OnnxModel(int8_path)}


def measure_size(args, net, desc) -> dict[str, dict]:
    """Every variant at ``desc``'s clip size: ``{name: {"seconds": [...], "parity": {...}}}``."""
    clips, calib, source = clips_for(args, desc)
    print(f"### {desc.num_frames}x{desc.img_size}: {source}")
    ref, seconds = torch_variant(net, clips, None)
    results = {"PyTorch fp32": {"seconds": seconds, "parity": export.parity(ref, ref)}}
    if common.native_bf16():
        outs, seconds = torch_variant(net, clips, torch.bfloat16)
        results["PyTorch bf16"] = {"seconds": seconds, "parity": export.parity(ref, outs)}
    with tempfile.TemporaryDirectory(prefix="star_bench_deploy_") as folder:
        for name, model in onnx_models(net, desc, calib, folder).items():
            outs, seconds = export.run_onnx(model, clips)
            results[f"onnxruntime {name}"] = {"seconds": seconds, "parity": export.parity(ref, outs)}
    return results


# --------------------------------------------------------------------------- report


def table(results: dict[str, dict]) -> str:
    """One markdown row per variant: s/clip (median, min-max), speed-up over PyTorch fp32, agreement."""
    base = common.median(results["PyTorch fp32"]["seconds"])
    rows = []
    for name, r in results.items():
        med, p = common.median(r["seconds"]), r["parity"]
        rows.append([name, common.num(med), common.spread(r["seconds"]), f"{base / med:.2f}x",
                     f"{p['probs']:.1e}", f"{p['boxes']:.1e}", f"{p['top_same']}/{p['clips']}"])
    return common.markdown_table(["variant", "s/clip", "min-max", "vs PyTorch fp32", "max |diff| probabilities",
                                  "max |diff| boxes", "same top class"], rows)


def goal_lines(results: dict[str, dict]) -> list[str]:
    """The issue's goals for onnxruntime int8, measured."""
    int8, base = results["onnxruntime int8"], common.median(results["PyTorch fp32"]["seconds"])
    speedup = base / common.median(int8["seconds"])
    agreement = int8["parity"]["top_same"] / int8["parity"]["clips"]
    where = "this CPU has native bf16: the 2x goal is set for CPUs without" if common.native_bf16() else "no native bf16 here"
    return [f"- onnxruntime int8 vs PyTorch fp32: {speedup:.2f}x (goal >= {INT8_GOAL_X:g}x; {where}): "
            f"{'met' if speedup >= INT8_GOAL_X else 'NOT met'}",
            f"- int8 same top class as PyTorch fp32: {100 * agreement:.0f}% of {int8['parity']['clips']} clips "
            f"(goal >= {100 * AGREEMENT_GOAL:.0f}%): {'met' if agreement >= AGREEMENT_GOAL else 'NOT met'}"]


def print_cpu_extras() -> None:
    """What decides int8 speed (VNNI dot products) and the onnxruntime version, beside print_machine."""
    import onnxruntime
    flags = common.cpu_flags()
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    print(f"int8 instructions: {', '.join(vnni) or 'none (no VNNI: int8 goes through AVX2 pmaddubsw)'}; "
          f"onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads for both runtimes\n")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.clips, args.calibration_clips = [(4, 32)], 2, 2
    export.require_deploy_packages()
    common.print_machine()
    print_cpu_extras()
    net, desc = network(args)
    start = time.perf_counter()
    for frames, size in args.sizes:
        results = measure_size(args, net, desc.with_clip(frames, size))
        print(table(results))
        print("\n".join(goal_lines(results)) + "\n")
    print(f"(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
