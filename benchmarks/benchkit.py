"""What the benchmarks share: the machine's name and description, the results
folder and CSV writing, peak-memory measurement, and the timing of a kernel
provider's forward, backward or both.

Imported as ``benchkit`` both by the scripts (``python benchmarks/x.py`` puts
this folder on ``sys.path``) and by the pytest-benchmark files
(``benchmarks/conftest.py`` puts it there under ``--import-mode=importlib``).
torch is imported inside the functions, so that a script can set environment
variables (``TRITON_INTERPRET``, ``MALLOC_MMAP_THRESHOLD_``) before it loads.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# ------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name(cuda: bool | None = None) -> str:
    """The results folder's name: the GPU's name where ``cuda`` (default: where a GPU
    is visible), else ``cpu-<model name>-<cores>c``, lower case, dashes."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    return _slug(torch.cuda.get_device_name(0) if cuda else f"cpu-{cpu_name()}-{os.cpu_count()}c")


def gpu_description() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def liger_version() -> str:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def ram_gib() -> float | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = int(next(line for line in lines if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        return None
    return round(mem_kb / 2**20, 1)


def load_avg_1m() -> float | None:
    """The 1-minute load average (other processes sharing the cores), where the OS has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_description(cuda: bool) -> dict:
    """The machine of a kernel benchmark: CPU, cores, versions, RAM, and the GPU where ``cuda``."""
    import torch

    desc = dict(cpu=cpu_name(), cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), triton=triton_version(),
                liger_kernel=liger_version())
    ram = ram_gib()
    if ram is not None:
        desc["ram_gib"] = ram
    if cuda:
        desc["gpu"] = gpu_description()
    return desc


# ------------------------------------------------------------------------------- results
def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows to ``path`` (its folder made); the columns are every key in the order first seen."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def csv_sink(filename: str, cuda: bool = False):
    """The body of a module-scoped pytest fixture: yields a list to append rows to,
    then writes them (if any) to ``results/<machine>/<filename>``::

        @pytest.fixture(scope="module")
        def sink():
            yield from benchkit.csv_sink("collate.csv")
    """
    rows: list[dict] = []
    yield rows
    if rows:
        path = write_csv(RESULTS / machine_name(cuda) / filename, rows)
        print(f"\nwrote {len(rows)} rows to {path}")


# ------------------------------------------------------------------------------- workers
def run_worker(script: Path, flag: str, spec: dict, env: dict | None = None) -> dict:
    """Run ``python script flag JSON(spec)`` in a fresh process (extra ``env`` on top of
    this one's) and return the JSON object on the last line of its output."""
    cmd = [sys.executable, str(Path(script).resolve()), flag, json.dumps(spec)]
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {flag} {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- peak memory
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    return ctypes.CDLL("libc.so.6")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> bool:
    """Whether the CPU peak (``VmHWM`` reset through ``/proc/self/clear_refs``, Linux) can be measured."""
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def mmap_large_allocations(threshold: int = 65536) -> None:
    """What ``MALLOC_MMAP_THRESHOLD_=65536`` does at start-up, now: glibc serves every
    allocation above ``threshold`` bytes by ``mmap``, so freed memory leaves the
    resident set at once and cannot hide a later peak."""
    _libc().mallopt(_M_MMAP_THRESHOLD, threshold)


def reset_peak(device: str) -> int:
    """Start a peak-memory measurement; returns the memory in use now, in bytes.

    CUDA: ``torch.cuda`` peak statistics reset, the allocated bytes returned. CPU (torch
    keeps no CPU allocator statistics): freed memory handed back to the OS
    (``malloc_trim``), the resident set returned, and the high-water mark ``VmHWM``
    reset to it through ``/proc/self/clear_refs``."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _libc().malloc_trim(0)
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return base


def peak(device: str) -> int:
    """The peak memory, in bytes, since :func:`reset_peak` (subtract what it returned)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


# ------------------------------------------------------------------------------- kernel timing
def synchronizer(device: str):
    """What waits for the device: ``torch.cuda.synchronize`` on CUDA, nothing on CPU."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def clear_grads(inputs: dict) -> None:
    for value in inputs.values():
        if getattr(value, "requires_grad", False):
            value.grad = None


def time_call(fn, mode: str, inputs: dict, sync=lambda: None) -> tuple[float, float]:
    """One call of ``fn(**inputs)`` (a scalar out); returns (wall seconds, process CPU
    seconds) of the part ``mode`` names: ``fwd`` (forward, building the autograd graph),
    ``bwd`` (backward alone, after an untimed forward) or ``fwd+bwd``."""
    clear_grads(inputs)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(**inputs)
    if mode == "fwd":
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu
    if mode == "bwd":
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
    out.backward()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def pedantic_modes(benchmark, fn, mode: str, inputs: dict, sync, rounds: int = 3) -> None:
    """pytest-benchmark rounds of ``fn(**inputs)``'s ``mode`` (as in :func:`time_call`),
    after one untimed forward and backward (Triton compilation, torch.compile)."""
    time_call(fn, "fwd+bwd", inputs, sync)

    def setup():
        clear_grads(inputs)
        sync()
        if mode == "bwd":  # the forward is not timed
            out = fn(**inputs)
            sync()
            return (out,), {}
        return (None,), {}

    def target(out):
        if mode != "bwd":
            out = fn(**inputs)
        if mode != "fwd":
            out.backward()
        sync()

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)


def bench_provider(benchmark, providers: dict, available, provider: str, mode: str, device: str, make_inputs,
                   **info) -> None:
    """A pytest-benchmark case of a kernel file: skipped where ``available(provider, device)``
    says no, else :func:`pedantic_modes` of ``providers[provider]`` on ``make_inputs()``;
    ``provider``, ``mode`` and ``info`` go to the benchmark's extra info."""
    import pytest

    ok, why = available(provider, device)
    if not ok:
        pytest.skip(why)
    pedantic_modes(benchmark, providers[provider], mode, make_inputs(), synchronizer(device))
    benchmark.extra_info.update(provider=provider, mode=mode, **info)
