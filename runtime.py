"""Where and in which precision to run: shared by main.py, test.py and the benchmarks."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("star")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it bf16 is
    emulated and slower than float32 (measured on a Zen 3 EPYC here: about 10x slower training)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` in {auto, fp32, bf16, fp16}; None means float32.

    ``auto``: float16 on CUDA, bfloat16 on a CPU with native bf16, else float32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise RuntimeError("fp16 autocast needs CUDA; on CPU use bf16 or fp32")
        return torch.float16
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning("this CPU has no native bfloat16: bf16 runs emulated and slower than fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None
