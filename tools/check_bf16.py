#!/usr/bin/env python
"""Are oneDNN's bf16 Conv3d weight gradients right on this CPU? Two standalone repros (torch only, for upstream).

    python tools/check_bf16.py               # both cases, 3 tries each
    python tools/check_bf16.py --no_mkldnn   # the same with oneDNN off (slow path; right where the bug is oneDNN's)
    python tools/check_bf16.py --channels_last   # in the layout main.py trains in on a CPU

- ``short-time``: ``Conv3d(C, C, (3, 1, 1), padding=(1, 0, 0))`` on an input of 2 time steps (R(2+1)D-18's
  temporal convs at layer3 for 8-frame clips, layer4 for 16). oneDNN 3.12's ``jit_bf16:avx512_core_bf16``
  backward-weights kernel (torch 2.14.1; seen on an AMD EPYC Zen 4) reads memory it never wrote: the weight
  gradient is NaN or off by up to 1e34, and differs between identical calls. The heap is filled with NaN before
  each call so that the garbage shows every time (on a fresh heap it is often zero, hence "now and then" in
  training). 1, 3 or more steps, stride 2 and the same conv on a time axis padded beforehand are right.
  model.TemporalConv3d pads beforehand in bf16 training.
- ``amx``: ``Conv3d(128, C, (1, 3, 3), padding=(0, 1, 1))`` on ``(1, 128, 4, 28, 28)``: NaN weight gradients from
  the AMX kernel on Intel CPUs with AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` makes it right).

Each result is the bf16 gradient's relative error against fp32 (bad above 0.05). Exit code 1 when a case is bad.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

TOLERANCE = 0.05   # bf16's relative error on these sums is ~0.004


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=("short-time", "amx"), default=["short-time", "amx"],
                   help="which repros to run")
    p.add_argument("--tries", type=int, default=3, help="calls per case (identical inputs)")
    p.add_argument("--no_mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    p.add_argument("--channels_last", action="store_true", help="channels_last_3d input, gradient and weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    return p


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in flags if "bf16" in f or f.startswith("amx")]


def fill_heap_with_nan() -> None:
    """Leave freed NaN blocks for the allocator to hand out next, so a kernel that reads unwritten memory shows it."""
    blocks = [torch.full((1 << n,), float("nan")) for n in range(14, 25, 2)]
    del blocks


def weight_grad(x, grad_out, weight, stride, padding, dtype) -> torch.Tensor:
    """``dL/dweight`` of ``conv3d(x, weight)`` for ``grad_out``, computed in ``dtype``, returned in fp32."""
    grads = torch.ops.aten.convolution_backward(
        grad_out.to(dtype), x.to(dtype), weight.to(dtype), None, stride, padding, (1, 1, 1), False, (0, 0, 0), 1,
        (False, True, False))
    return grads[1].float()


def conv_case(name: str, seed: int, channels_last: bool = False):
    """``(x, grad_out, weight, stride, padding)`` of a repro case."""
    torch.manual_seed(seed)
    if name == "short-time":
        x, weight, padding = torch.randn(4, 64, 2, 8, 8), torch.randn(64, 64, 3, 1, 1) * 0.05, (1, 0, 0)
    else:
        x, weight, padding = torch.randn(1, 128, 4, 28, 28), torch.randn(230, 128, 1, 3, 3) * 0.05, (0, 1, 1)
    grad_out = torch.randn_like(torch.nn.functional.conv3d(x, weight, padding=padding)) * 1e-3
    if channels_last:
        x, grad_out, weight = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, grad_out, weight))
    return x, grad_out, weight, (1, 1, 1), padding


def relative_errors(name: str, tries: int, seed: int, pad_first: bool = False, channels_last: bool = False) -> list[float]:
    """The bf16 weight gradient's relative error against fp32, per try (inf when not finite). ``pad_first``: the
    time axis zero-padded beforehand and the conv run without time padding (the workaround)."""
    x, grad_out, weight, stride, padding = conv_case(name, seed, channels_last)
    if pad_first:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, padding[0], padding[0]))
        padding = (0, *padding[1:])
    reference = weight_grad(x, grad_out, weight, stride, padding, torch.float32)
    errors = []
    for _ in range(tries):
        fill_heap_with_nan()
        grad = weight_grad(x, grad_out, weight, stride, padding, torch.bfloat16)
        error = ((grad - reference).norm() / reference.norm()).item()
        errors.append(error if torch.isfinite(grad).all() and error == error else float("inf"))
    return errors


def report(label: str, errors: list[float]) -> bool:
    bad = any(e > TOLERANCE for e in errors)
    print(f"  {label}: {'WRONG' if bad else 'right'} (relative error per try: "
          f"{', '.join('inf' if e == float('inf') else f'{e:.3g}' for e in errors)})")
    return bad


def main(args) -> int:
    torch.backends.mkldnn.enabled = not args.no_mkldnn
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU flags: "
          f"{' '.join(cpu_flags()) or 'no bf16/amx flags'}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}, "
          f"mkldnn {'on' if torch.backends.mkldnn.enabled else 'off'}, threads {torch.get_num_threads()}"
          f"{', channels_last_3d' if args.channels_last else ''}")
    reproduced = False
    for name in args.cases:
        x, _, weight, _, padding = conv_case(name, args.seed)
        print(f"{name}: bf16 weight gradient of Conv3d{tuple(weight.shape[1::-1])} kernel {tuple(weight.shape[2:])}, "
              f"padding {padding}, input {tuple(x.shape)}:")
        reproduced |= report("as is", relative_errors(name, args.tries, args.seed, False, args.channels_last))
        if name == "short-time":
            report("time padded beforehand (the workaround)",
                   relative_errors(name, args.tries, args.seed, True, args.channels_last))
    print("reproduced: a bf16 weight gradient is wrong here" if reproduced
          else "not reproduced: the bf16 weight gradients are right for these shapes")
    return 1 if reproduced else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
