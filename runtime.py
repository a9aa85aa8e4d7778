"""What every CLI shares at run time: device and precision, distributed set-up, logging, one-line errors,
numeric flag checks (main.py, test.py, export.py, stream.py, app.py and the benchmarks)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys

import torch
from tqdm import tqdm


class UsageError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit code 2."""


def one_line(err: BaseException, path=None, limit: int = 300) -> str:
    """The first line of an error, for a one-line message; with ``path``, the file name prefix is dropped
    (the caller names the file) and so are ``[Errno N]`` tags."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    if path is not None:
        path = os.fspath(path)
        if text.startswith(path + ": "):
            text = text[len(path) + 2:]
        text = text.replace(f": '{path}'", "").replace(f" '{path}'", "")
    return re.sub(r"\[Errno -?\d+\] ", "", text)[:limit]


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


# ----------------------------------------------------------------------------- command line


def number(kind=int, minimum: float = 0, strict: bool = False, maximum: float = math.inf):
    """An argparse ``type``: a finite ``kind`` (int or float) at least ``minimum`` (above it when ``strict``), at most
    ``maximum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {minimum:g}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value
    return parse


def writable_dir(path, flag: str = "--output_dir"):
    """``path`` created if missing and checked writable (a file made and removed there); a UsageError naming ``flag``
    and the folder otherwise, so that a CLI stops before any work instead of failing at its first write."""
    import pathlib
    import tempfile
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({one_line(err, path)})") from None
    return path


EXIT_USAGE = 2   # bad flags, model or input: one line and this exit code


def run_cli(main, args, errors: tuple = ()) -> int:
    """``main(args)`` of a CLI: :class:`UsageError` and ``errors`` become one ``error:`` line (in the log once it is
    set up, else on stderr) and exit code 2; Ctrl-C exits 130; the log is closed either way."""
    try:
        return main(args)
    except (UsageError, *errors) as err:
        message = f"error: {one_line(err)}"
        if logging_is_set_up():
            logging.getLogger("star").error(message)
        else:
            print(message, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:   # before a CLI's own handlers are in place
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_logging()


# ----------------------------------------------------------------------------- logging


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break a progress bar; on stdout, or stderr when stdout carries data."""

    def __init__(self, to_stderr: bool = False):
        super().__init__()
        self.to_stderr = to_stderr

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr if self.to_stderr else sys.stdout)
        except (OSError, ValueError):
            self.handleError(record)


def setup_logging(log_path=None, rank: int = 0, to_stderr: bool = False) -> None:
    """Console (INFO on rank 0, WARNING elsewhere) plus the log file (rank 0), on the root logger so that the
    warnings of video.py and dataset.py land in the same places; ``star.*`` logs INFO. Calling it again
    replaces the handlers it added before (and only those). ``to_stderr``: the console lines go to stderr (stdout
    carries a CLI's data, e.g. ``stream.py --tube_events -``)."""
    close_logging()
    root = logging.getLogger()
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("star").setLevel(logging.INFO)
    console = _TqdmHandler(to_stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    handlers = [console]
    if log_path is not None and rank == 0:
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"))
        handlers.append(handler)
    for h in handlers:
        h._star = True
        root.addHandler(h)


def close_logging() -> None:
    """Remove and close the handlers of :func:`setup_logging` (the log file is complete)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_star", False)]:
        root.removeHandler(h)
        h.close()


def logging_is_set_up() -> bool:
    """Whether :func:`setup_logging`'s handlers are in place."""
    return any(getattr(h, "_star", False) for h in logging.getLogger().handlers)


# ----------------------------------------------------------------------------- distributed


def init_distributed(device_name: str = "auto") -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; under torchrun starts the process group (nccl on CUDA, gloo on
    the CPU) and selects this rank's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (in rank order) on every rank; ``[obj]`` when not distributed."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
