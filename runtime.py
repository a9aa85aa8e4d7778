"""Where and in which precision to run: shared by main.py, test.py and the benchmarks."""
from __future__ import annotations

import contextlib

import torch


class UsageError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit code 2."""


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``. ``cuda`` without a GPU -> UsageError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available to PyTorch here (use --device cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {name!r} (auto, cpu or cuda)")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matmuls are several times faster than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    for check in checks:
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def autocast_settings(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, str]:
    """``(autocast dtype or None for fp32, note for the log)``.

    ``auto``: fp16 on CUDA; bf16 on a CPU with native bf16 (AVX512-BF16/AMX); fp32 otherwise.
    A forced low precision where the hardware has no fast path is honoured, with a note saying so.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None, "fp32"
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16, "fp16 autocast (auto: cuda)"
        if cpu_has_native_bf16():
            return torch.bfloat16, "bf16 autocast (auto: this CPU has native bf16)"
        return None, "fp32 (auto: this CPU has no native bf16, bf16 would be slower)"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise UsageError(f"unknown precision {precision!r} (auto, fp32, bf16 or fp16)")
    note = f"{precision} autocast"
    if device.type == "cpu" and not (dtype == torch.bfloat16 and cpu_has_native_bf16()):
        note += " (forced; this CPU has no native support for it, so it will be slower than fp32)"
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU does not support bf16 (use fp16 or fp32)")
    return dtype, note


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for ``dtype`` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

