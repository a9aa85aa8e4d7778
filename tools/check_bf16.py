#!/usr/bin/env python
"""Does bf16 autocast give finite Conv3d weight gradients on this CPU? The one-conv repro of a oneDNN bug.

    python tools/check_bf16.py            # the trunk's layer2 spatial conv, out channels 224..256
    python tools/check_bf16.py --no_mkldnn  # the same with oneDNN off (slow path; finite where the bug is oneDNN's)

On CPUs with AMX, torch 2.14.1's oneDNN bf16 kernel returns an all-NaN weight gradient for
``Conv3d(128, C, (1, 3, 3), padding=(0, 1, 1))`` on a ``(1, 128, 4, 28, 28)`` input for C = 230, 232, 240, 256
(R(2+1)D-18's layer2) while the forward and the input gradient are finite; ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``
(AMX off) makes it finite. main.py checks the run's real shapes before it trains in bf16 and falls back to fp32.
Exit code 1 when a NaN/inf gradient was reproduced (worth reporting upstream with this output), else 0.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

INPUT_SHAPE = (1, 128, 4, 28, 28)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_channels", type=int, nargs="+", default=[224, 230, 232, 240, 256],
                   help="output channels of the conv to try")
    p.add_argument("--channels_last", action="store_true", help="channels_last_3d input and weights")
    p.add_argument("--no_mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    return p


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in flags if "bf16" in f or f.startswith("amx")]


def conv_gradients_finite(out_channels: int, channels_last: bool, seed: int) -> dict:
    """Forward and backward of one conv under bf16 autocast; which results are finite."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(128, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
    x = torch.randn(INPUT_SHAPE, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().sum().backward()
    return {"forward": bool(torch.isfinite(y).all()), "input grad": bool(torch.isfinite(x.grad).all()),
            "weight grad": bool(torch.isfinite(conv.weight.grad).all())}


def main(args) -> int:
    torch.backends.mkldnn.enabled = not args.no_mkldnn
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU flags: "
          f"{' '.join(cpu_flags()) or 'no bf16/amx flags'}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}, "
          f"mkldnn {'on' if torch.backends.mkldnn.enabled else 'off'}")
    print(f"Conv3d(128, C, (1, 3, 3), padding=(0, 1, 1)) on {INPUT_SHAPE} under bf16 autocast"
          f"{', channels_last_3d' if args.channels_last else ''}:")
    reproduced = False
    for channels in args.out_channels:
        finite = conv_gradients_finite(channels, args.channels_last, args.seed)
        bad = [k for k, ok in finite.items() if not ok]
        reproduced |= bool(bad)
        print(f"  C={channels}: " + ("finite" if not bad else f"NON-FINITE {', '.join(bad)}"))
    print("reproduced: bf16 training is not safe here (main.py falls back to fp32)" if reproduced
          else "not reproduced: bf16 gradients are finite for these shapes")
    return 1 if reproduced else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
