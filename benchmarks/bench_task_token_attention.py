"""Benchmark: task-token attention against PyTorch SDPA with an explicit mask.

Run (timings on; the project's pytest config disables them by default):

    pytest benchmarks/bench_task_token_attention.py --benchmark-enable          # CPU set
    pytest benchmarks/bench_task_token_attention.py --benchmark-enable -m gpu   # GPU set only

Providers:
* ``triton``    ``task_token_attention(..., backend="triton")`` (GPU only; on CPU the kernels
  would run under the Triton interpreter, which measures Python, not the kernel),
* ``torch``     ``task_token_attention(..., backend="torch")``,
* ``sdpa_mask`` ``task_token_attention_reference``: SDPA over ``cat(context, self keys)``
  with an explicit ``[B, 1, K, N + K]`` boolean mask, what one writes without the op.

For each case the bytes the forward must move are counted (valid context keys and values,
queries, self keys/values read once, the output written once); achieved bandwidth is those
bytes over the median time (``best_fraction_of_copy`` uses the fastest round, steadier on a
shared CPU). The card's (or the CPU's) copy bandwidth is measured in the same
session with a large ``dst.copy_(src)`` (read + write), and the forward is reported against
a target of 70 % of it. With timings on, the rows are written to
``benchmarks/results/<machine>/task_token_attention.csv`` (the machine is described in the
rows: device name, cores, torch and triton versions).
"""
from __future__ import annotations

import os

import benchkit
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tpo.kernels.task_token_attention import task_token_attention, task_token_attention_reference

CUDA = torch.cuda.is_available()
TARGET_FRACTION = 0.70

# (B, Hq, Hkv, K, N, D, kv_lengths as fractions of N)
GPU_CASES = [
    (1, 32, 8, 8, 32768, 128, (1.0,)),
    (4, 32, 8, 8, 32768, 128, (1.0, 0.75, 0.5, 0.25)),
    (8, 32, 8, 8, 8192, 128, (1.0,) * 8),
    (1, 32, 8, 16, 131072, 128, (1.0,)),
]
CPU_CASES = [
    (2, 8, 2, 8, 4096, 64, (1.0, 0.6)),
    (1, 16, 4, 8, 16384, 64, (1.0,)),
]


# --------------------------------------------------------------------------------- machine
def machine_description() -> dict:
    if CUDA:
        device = benchkit.gpu_description()
    else:
        device = f"CPU {benchkit.cpu_name()}, {torch.get_num_threads()} torch threads"
    return dict(device=device, cpu=benchkit.cpu_name(), cpu_cores=os.cpu_count() or 1, torch=torch.__version__,
                triton=benchkit.triton_version())


# ----------------------------------------------------------------------------------- timing
def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _measure_copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    device = "cuda" if CUDA else "cpu"
    nbytes = (1 << 30) if CUDA else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync()
    reps = 20 if CUDA else 5
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        import time

        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        seconds = best
    del src, dst
    return 2 * nbytes / seconds


@pytest.fixture(scope="module")
def copy_bandwidth():
    return _measure_copy_bandwidth()


@pytest.fixture(scope="module")
def sink():
    yield from benchkit.csv_sink("task_token_attention.csv", cuda=CUDA)


def _inputs(B, Hq, Hkv, K, N, D, fractions, dtype, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, Hq, K, D), rand(B, Hkv, N, D), rand(B, Hkv, N, D)
    ks, vs = rand(B, Hkv, K, D), rand(B, Hkv, K, D)
    lengths = torch.tensor([max(1, round(f * N)) for f in fractions], device=device)
    return (q, k, v, ks, vs), lengths


def _forward_bytes(B, Hq, Hkv, K, N, D, lengths, elem) -> int:
    context = 2 * int(lengths.sum()) * Hkv * D  # valid keys + values
    small = B * Hq * K * D * 2 + 2 * B * Hkv * K * D  # q read + out written, self k/v
    return (context + small) * elem


PROVIDERS = {
    "triton": lambda args, lengths: task_token_attention(*args, kv_lengths=lengths, backend="triton"),
    "torch": lambda args, lengths: task_token_attention(*args, kv_lengths=lengths, backend="torch"),
    "sdpa_mask": lambda args, lengths: task_token_attention_reference(*args, kv_lengths=lengths),
}


def _run_case(benchmark, sink, copy_bandwidth, provider, mode, case, dtype, device):
    B, Hq, Hkv, K, N, D, fractions = case
    backward = mode == "fwd+bwd"
    args, lengths = _inputs(B, Hq, Hkv, K, N, D, fractions, dtype, device, backward)
    op = PROVIDERS[provider]
    grad = torch.randn(B, Hq, K, D, device=device, dtype=dtype)
    leaves = list(args)

    def once():
        out = op(args, lengths)
        if backward:
            torch.autograd.grad(out, leaves, grad)

    inner = 10 if CUDA else 1  # several launches per timed round so one sync does not dominate

    def target():
        for _ in range(inner):
            once()
        _sync()

    once()
    _sync()  # compile / warm up outside the timing
    rounds = 20 if CUDA else 10
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    seconds = benchmark.stats.stats.median / inner
    best = benchmark.stats.stats.min / inner
    nbytes = _forward_bytes(B, Hq, Hkv, K, N, D, lengths, torch.tensor([], dtype=dtype).element_size())
    achieved = nbytes / seconds
    fraction = achieved / copy_bandwidth
    row = dict(
        machine=benchkit.machine_name(CUDA),
        **machine_description(),
        provider=provider,
        mode=mode,
        dtype=str(dtype).replace("torch.", ""),
        B=B, Hq=Hq, Hkv=Hkv, K=K, N=N, D=D,
        kv_lengths=" ".join(str(int(x)) for x in lengths.tolist()),
        median_us=round(seconds * 1e6, 2),
        min_us=round(best * 1e6, 2),
        forward_bytes=nbytes,
        achieved_GBps=round(achieved / 1e9, 2),
        copy_GBps=round(copy_bandwidth / 1e9, 2),
        fraction_of_copy=round(fraction, 3),
        best_fraction_of_copy=round(nbytes / best / copy_bandwidth, 3),
        target_fraction=TARGET_FRACTION if mode == "fwd" else "",
        meets_target=(fraction >= TARGET_FRACTION) if mode == "fwd" else "",
    )
    benchmark.extra_info.update(row)
    sink.append(row)


@pytest.mark.skipif(CUDA, reason="the CPU set runs where there is no GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["torch", "sdpa_mask"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-K{}-N{}-D{}".format(*c[:6]))
def test_cpu(benchmark, sink, copy_bandwidth, case, provider, mode):
    benchmark.group = f"cpu {mode} " + "B{}-Hq{}-Hkv{}-K{}-N{}-D{}".format(*case[:6])
    _run_case(benchmark, sink, copy_bandwidth, provider, mode, case, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["triton", "torch", "sdpa_mask"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-K{}-N{}-D{}".format(*c[:6]))
def test_gpu(benchmark, sink, copy_bandwidth, case, provider, mode):
    benchmark.group = f"gpu {mode} " + "B{}-Hq{}-Hkv{}-K{}-N{}-D{}".format(*case[:6])
    _run_case(benchmark, sink, copy_bandwidth, provider, mode, case, torch.bfloat16, "cuda")
