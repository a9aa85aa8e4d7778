"""Helpers shared by the benchmarks in ``bench/``.

- the machine: CPU model, cores, torch version, native bf16 or not, GPU (``machine_info``);
- timing: warm-up runs, then the median of N timed runs (``time_runs``);
- peak RSS: of this process (``self_peak_rss_mb``) and of one child process and its own
  children, taken from ``os.wait4`` so each variant is measured alone (``run_child``);
- the variant grammar ``dtype[+option...][:batch]`` used by the network and training benches;
- matmul peak GFLOP/s for a dtype (the roof the network is compared with) and FLOP counting;
- markdown tables.

A child process reports its figures by writing JSON to the file named in ``$STAR_BENCH_RESULT``
(``write_result``); the parent reads it back after the child ends.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

RESULT_ENV = "STAR_BENCH_RESULT"
DTYPES = ("fp32", "bf16", "fp16")
OPTIONS = {"cl": "channels_last_3d", "fold": "BatchNorm folded into convs", "compile": "torch.compile"}


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty when unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); else autocast emulates it."""
    import runtime
    return runtime.cpu_has_native_bf16()


def machine_info(device: str = "cpu") -> dict:
    """What the figures were measured on."""
    import torch
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    info = {"CPU": cpu_model(), "cores (os.cpu_count)": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "SIMD": ", ".join(simd) or "unknown", "bf16 native": "yes" if native_bf16() else "no (emulated)",
            "torch": torch.__version__, "python": platform.python_version(),
            "load average (1 min)": f"{os.getloadavg()[0]:.2f}"}
    del device   # kept for callers; a GPU is listed whenever one is visible
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
        info["CUDA"] = torch.version.cuda
    return info


def print_machine(device: str = "cpu") -> dict:
    """Print the machine as a two-column markdown table; return the dict."""
    info = machine_info(device)
    print(markdown_table(["machine", ""], [[k, v] for k, v in info.items()]))
    print()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        # OpenMP threads that compete with other processes for the cores make a forward pass several times slower
        # from run to run: such figures are noise, not the code's speed (bench/README.md).
        print(f"WARNING: load average {load:.1f} on {cores} cores: other processes compete for the cores, "
              "the figures below are not representative\n")
    return info


# --------------------------------------------------------------------------- timing


def time_runs(fn: Callable[[], object], warmup: int, repeats: int,
              sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds of each timed call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so GPU work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the timed runs, to show how noisy a median is."""
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else "-"


# --------------------------------------------------------------------------- memory and child processes


def _maxrss_mb(usage) -> float:
    """``ru_maxrss`` in MB (Linux reports KiB, macOS bytes)."""
    return usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def self_peak_rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF))


@dataclasses.dataclass
class ChildRun:
    """How one child process went: exit code, wall seconds, its peak RSS (the largest of it and the
    children it waited for), the JSON it wrote with ``write_result`` (None if none), timed out or not."""

    returncode: int
    seconds: float
    peak_rss_mb: float
    result: dict | None
    timed_out: bool = False


def run_child(cmd: Sequence[str], timeout: float | None = None, env: dict | None = None) -> ChildRun:
    """Run ``cmd`` (its output goes straight to ours) and measure it alone.

    The peak RSS comes from ``os.wait4`` on this very child, so earlier children do not leak into it
    (``RUSAGE_CHILDREN`` would give the maximum over all children so far). Past ``timeout`` seconds
    the child's process group (started here, so only its own processes) is killed."""
    fd, result_path = tempfile.mkstemp(prefix="star_bench_", suffix=".json")
    os.close(fd)
    os.remove(result_path)   # absent unless the child writes it
    child_env = {**os.environ, **(env or {}), RESULT_ENV: result_path}
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=child_env, start_new_session=True)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here; keep Popen from waiting again
    result = None
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
        os.remove(result_path)
    return ChildRun(proc.returncode, seconds, _maxrss_mb(usage), result, timed_out)


def failure(run: ChildRun) -> str | None:
    """Why a child gave no figures (None when it did): timed out, its reported error, or its exit code."""
    if run.timed_out:
        return f"timed out after {run.seconds:.0f} s"
    result = run.result or {}
    if run.returncode != 0 or "times" not in result:
        return result.get("error", f"exit code {run.returncode}")
    return None


def write_result(result: dict) -> None:
    """In a child: hand ``result`` to the parent (``run_child``); printed instead when run by hand."""
    path = os.environ.get(RESULT_ENV)
    if not path:
        print(json.dumps(result))
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f)


def child_cmd(script: str, argv: Sequence[str]) -> list[str]:
    """The command that re-runs ``script`` (a path) with ``argv`` under this interpreter."""
    return [sys.executable, script, *argv]


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to measure: ``dtype[+option...][:batch]``, e.g. ``bf16+cl:2``."""

    dtype: str
    options: tuple[str, ...] = ()
    batch: int | None = None   # None: the bench's --batch_size

    @property
    def name(self) -> str:
        return "+".join((self.dtype, *self.options)) + (f":{self.batch}" if self.batch else "")


def parse_variant(text: str) -> Variant:
    """``argparse`` type for the variant grammar ``dtype[+option...][:batch]``."""
    import argparse
    spec, _, batch = text.partition(":")
    dtype, *options = spec.split("+")
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text}: dtype must be one of {', '.join(DTYPES)}")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text}: unknown option(s) {unknown} (known: {', '.join(OPTIONS)})")
    if batch and (not batch.isdigit() or int(batch) < 1):
        raise argparse.ArgumentTypeError(f"{text}: batch must be a positive integer")
    return Variant(dtype, tuple(sorted(set(options), key=list(OPTIONS).index)), int(batch) if batch else None)


def torch_dtype(name: str):
    """``fp32`` -> None (no autocast), ``bf16``/``fp16`` -> the torch dtype."""
    import torch
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_label(name: str, device: str) -> str:
    """``bf16`` on a CPU without native bf16 is labelled emulated."""
    if name == "bf16" and device == "cpu" and not native_bf16():
        return "bf16 (emulated)"
    return name


def autocast(device: str, dtype_name: str):
    """The autocast context of a variant's dtype on ``device`` (no autocast at all for fp32): runtime.autocast."""
    import runtime
    return runtime.autocast(device, torch_dtype(dtype_name))


def sync_for(device: str) -> Callable[[], None] | None:
    """What to call before reading the clock so queued GPU work is counted."""
    import torch
    return torch.cuda.synchronize if device.startswith("cuda") else None


# --------------------------------------------------------------------------- compute roofs


def matmul_gflops(dtype_name: str, n: int = 2048, device: str = "cpu", warmup: int = 1, repeats: int = 5,
                  budget_s: float = 20.0) -> float:
    """Measured GFLOP/s of an ``n x n @ n x n`` matmul in ``dtype_name`` (median of the timed runs):
    the practical peak of this machine for that dtype. Fewer runs than ``repeats`` when they would
    take over ``budget_s`` (emulated bf16 on a CPU is ~50x slower than fp32)."""
    import time

    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = sync_for(device) or (lambda: None)
    start = time.perf_counter()
    torch.mm(a, b)   # first call: allocations, kernel choice; also sizes the budget
    sync()
    first = time.perf_counter() - start
    repeats = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = time_runs(lambda: torch.mm(a, b), max(warmup - 1, 0), repeats, sync_for(device))
    return 2 * n ** 3 / median(times) / 1e9


def count_flops(model, x) -> int:
    """FLOPs of one forward pass of ``model(x)`` as counted by ``torch.utils.flop_counter``
    (convolutions, matmuls and attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    # Not under no_grad/inference_mode: the counter's module tracker then fails on parameters passed
    # as module inputs (the decoder's queries). Parameters not requiring grad keep autograd from
    # recording anything, so this costs no more memory than inference.
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with counter:
            model(x)
    finally:
        for p in params:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed, pipes escaped."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: float) -> str:
    """A figure with 3 significant digits, without exponent for everyday sizes (0.00123, 4.56, 789, 12345)."""
    if value != value or value == 0:   # nan or zero
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def one_line(err: BaseException) -> str:
    """An exception as one short line with its type, for a table cell."""
    import runtime
    return f"{type(err).__name__}: {runtime.one_line(err, limit=140)}"


# --------------------------------------------------------------------------- command line


def add_timing_args(p, what: str, warmup: int = 1, repeats: int = 3) -> None:
    """``--warmup`` and ``--repeats`` of ``what`` (e.g. "forward passes"): the flags every benchmark has."""
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed {what} before timing")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed {what}; the median is reported")


def network_parser(doc: str, what: str, whats: str, frames: int, size: int, batch_size: int, variants_help: str):
    """The parser of the network benchmarks (bench_network, bench_training): device, clip size, batch, variants
    (``dtype[+option...][:batch]``) and timing of ``whats`` (the plural of ``what``)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the network runs")
    p.add_argument("--frames", type=int, default=frames, help="frames per clip (T)")
    p.add_argument("--size", type=int, default=size, help="frame size (S x S)")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"clips per {what} for variants without ':B'")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=None, help=variants_help)
    add_timing_args(p, whats)
    return p
