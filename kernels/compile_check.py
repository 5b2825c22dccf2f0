"""Compile the Triton kernels for a CUDA GPU on a machine without one.

The Triton interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) checks what
they compute, not whether they compile for a GPU: it accepts code that the GPU
compiler rejects, and it has no shared memory or registers to run out of. This check
closes that gap. It runs the kernels' own launch code (``_triton_forward`` and
``_triton_backward`` of each op) on CPU tensors of the shapes and dtypes a GPU run
would see, with every ``@triton.jit`` kernel of the op replaced by a recorder that
compiles the launch for ``cuda:<arch>`` through Triton's ahead-of-time path
(``JITFunction.warmup`` against a driver that only names the target): the same
arguments, the same specialisation (dtypes, 16-byte alignment, strides of 1), the same
tiles, warps and stages. ``ptxas`` (shipped with Triton) compiles each to a cubin,
whose registers, spills and shared memory ``cuobjdump`` reports.

A launch fails the check when it does not compile, when its shared memory exceeds
what one program may have on that architecture (the launch would raise
``OutOfResources``), or when it spills registers to local memory.

``python -m tpo.kernels.compile_check [--arch 90 80] [--csv OUT]`` prints one line per
compiled kernel and exits 1 on a failure. It needs Triton's NVIDIA backend (the
``triton`` wheel from PyPI has it) and ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["ARCHS", "KernelBuild", "check_builds", "compile_launches", "main"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """What limits one program on a CUDA architecture (CUDA programming guide, compute capabilities)."""

    name: str
    sms: int  # of the card the launch is planned for (split counts follow it)
    max_shared_per_block: int  # bytes, with the opt-in Triton uses
    shared_per_sm: int
    max_threads_per_sm: int
    registers_per_sm: int = 65536


ARCHS: dict[int, Arch] = {
    80: Arch("A100", 108, 166912, 167936, 2048),
    86: Arch("RTX 30xx / A10", 84, 101376, 102400, 1536),
    89: Arch("L4 / L40 / RTX 40xx", 58, 101376, 102400, 1536),
    90: Arch("H100 / H200", 132, 232448, 233472, 2048),
    100: Arch("B200 / GB200", 148, 232448, 233472, 2048),
    120: Arch("RTX 50xx / RTX PRO 6000", 170, 101376, 102400, 1536),
}

_OPS = ("tpo.kernels.fused_linear_logprob", "tpo.kernels.task_token_attention")


@dataclasses.dataclass
class KernelBuild:
    """One compiled launch: which kernel, for which case and architecture, and what it uses."""

    kernel: str
    case: str
    arch: int
    signature: str  # the pointer dtypes and the constexprs it was specialised on
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # local memory per thread (register spills)
    shared_bytes: int  # dynamic + static shared memory per program
    programs_per_sm: int  # resident at once, as registers, shared memory and threads allow
    tensor_cores: str = "-"  # its matrix instructions: "tcgen05" (sm_100), "wgmma" (sm_90), "mma", "-" (none)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps


# --------------------------------------------------------------------------------------
# Recording launches and compiling them for a target
# --------------------------------------------------------------------------------------
class _TargetDriver:
    """The part of a Triton driver that ``JITFunction.warmup`` reads: the current device
    (the arch number, so each arch gets its own kernel cache) and its target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):  # anything else would need a GPU
        raise AttributeError(f"tpo.kernels.compile_check: compiling for a target has no {name!r} (it needs a GPU)")


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` compiles
    that launch for the target instead of running it."""

    def __init__(self, fn, on_compile: Callable[..., None]):
        self.fn = fn
        self.on_compile = on_compile

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.fn.warmup(*args, grid=grid, **kwargs)
            self.on_compile(self.fn, compiled, args, kwargs)

        return launch


def _jit_kernels(module) -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    return {name: value for name, value in vars(module).items() if isinstance(value, JITFunction)}


def _tool(name: str) -> str:
    """Path of an NVIDIA tool shipped with Triton's backend (``ptxas``, ``cuobjdump``)."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
    except Exception as exc:  # noqa: BLE001 - any failure means the tool cannot be found
        raise RuntimeError(
            f"tpo.kernels.compile_check: Triton's NVIDIA backend has no {name} here ({exc}); install the triton "
            "wheel from PyPI, which ships it"
        ) from exc
    return path


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, static shared bytes) of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if found is None:
        raise RuntimeError(f"tpo.kernels.compile_check: cannot read cuobjdump's resource usage:\n{out.stdout}")
    regs, shared, local = (int(x) for x in found.groups())
    return regs, local, shared


def _matrix_instructions(ptx: str) -> str:
    if re.search(r"\btcgen05\.mma", ptx):
        return "tcgen05"
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def _programs_per_sm(arch: Arch, registers: int, shared: int, threads: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = arch.registers_per_sm // max(1, per_warp * threads // 32)
    by_shared = arch.shared_per_sm // (shared + 1024) if shared else by_regs  # 1 KiB per program is reserved
    by_threads = arch.max_threads_per_sm // threads
    return max(0, min(by_regs, by_shared, by_threads))


@contextlib.contextmanager
def _recording(arch: int, builds: list[KernelBuild], case: list[str]) -> Iterator[None]:
    """Every op's kernels replaced by recorders compiling for ``arch``, planned for its SM count."""
    from triton.runtime import driver

    spec = ARCHS[arch]
    modules = [importlib.import_module(name) for name in _OPS]
    saved: list[tuple[object, str, object]] = []

    def on_compile(fn, compiled, args, kwargs):
        regs, local, static_shared = _resource_usage(compiled.asm["cubin"])
        shared = int(compiled.metadata.shared) + static_shared
        warps, stages = int(compiled.metadata.num_warps), int(compiled.metadata.num_stages)
        dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
        consts = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k not in ("num_warps", "num_stages"))
        builds.append(KernelBuild(
            kernel=fn.__name__, case=case[0], arch=arch, signature=" ".join(dtypes + [consts]).strip(),
            num_warps=warps, num_stages=stages, registers=regs, spill_bytes=local, shared_bytes=shared,
            programs_per_sm=_programs_per_sm(spec, regs, shared, 32 * warps),
            tensor_cores=_matrix_instructions(compiled.asm.get("ptx", "")),
        ))

    previous = getattr(driver, "_active", None)  # not driver.active: that would look for a GPU
    try:
        driver.set_active(_TargetDriver(arch))
        for module in modules:
            for name, fn in _jit_kernels(module).items():
                saved.append((module, name, fn))
                setattr(module, name, _Recorder(fn, on_compile))
            saved.append((module, "_gpu_sms", module._gpu_sms))
            module._gpu_sms = lambda device, _n=spec.sms: _n
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        driver._active = previous


# --------------------------------------------------------------------------------------
# The launches a GPU run makes
# --------------------------------------------------------------------------------------
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _logprob_case(n: int, h: int, v: int, dtype: torch.dtype, bias: bool) -> Callable[[], None]:
    def run():
        op = importlib.import_module("tpo.kernels.fused_linear_logprob")
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, h, generator=g).to(dtype)
        weight = torch.randn(v, h, generator=g).to(dtype)
        b = torch.randn(v, generator=g).to(dtype) if bias else None
        labels = torch.randint(0, v, (n,), generator=g)
        lse, _ = op._triton_forward(hidden, weight, b, labels, 1.0)
        op._triton_backward(hidden, weight, b, labels, lse, torch.ones(n), 1.0, n, (True, True, bias))

    return run


def _attention_case(b: int, hq: int, hkv: int, k: int, n: int, d: int, dtype, lengths: bool, self_kv: bool):
    def run():
        op = importlib.import_module("tpo.kernels.task_token_attention")
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, hq, k, d, generator=g).to(dtype)
        kk = torch.randn(b, hkv, n, d, generator=g).to(dtype)
        vv = torch.randn(b, hkv, n, d, generator=g).to(dtype)
        ks = torch.randn(b, hkv, k, d, generator=g).to(dtype) if self_kv else None
        vs = torch.randn(b, hkv, k, d, generator=g).to(dtype) if self_kv else None
        lens = torch.full((b,), n, dtype=torch.int32) if lengths else None
        scale = d**-0.5
        out, lse = op._triton_forward(q, kk, vv, ks, vs, lens, scale)
        op._triton_backward(q, kk, vv, ks, vs, lens, scale, out, lse, torch.randn_like(out))

    return run


def cases() -> dict[str, Callable[[], None]]:
    """Every launch configuration the ops choose: each dtype, aligned and odd sizes, bias,
    grouped-query heads, head dims below, at and above 128 and not a power of two, one
    and several query blocks (the backward's atomic key/value gradients), lengths and self keys."""
    out: dict[str, Callable[[], None]] = {}
    for dtype in _DTYPES:
        t = str(dtype).removeprefix("torch.")
        # sizes divisible by 16 as the GPU set's (N=8192, H=4096, V=128256): the same specialisation
        out[f"logprob {t} N=256 H=4096 V=1008"] = _logprob_case(256, 4096, 1008, dtype, False)
        out[f"logprob {t} N=100 H=1030 V=999 bias"] = _logprob_case(100, 1030, 999, dtype, True)
        attention = {  # (B, Hq, Hkv, K, N, D, lengths, self keys)
            "K=1 Hq=Hkv=8 D=128 lengths self": (2, 8, 8, 1, 1000, 128, True, True),
            "K=4 Hq=32 Hkv=8 D=128 lengths": (2, 32, 8, 4, 1000, 128, True, False),
            "K=8 Hq=32 Hkv=8 N=4096 D=128 lengths": (2, 32, 8, 8, 4096, 128, True, False),
            "K=16 Hq=32 Hkv=8 D=128 self": (1, 32, 8, 16, 777, 128, False, True),
            "K=3 Hq=Hkv=4 D=64": (2, 4, 4, 3, 500, 64, False, False),
            "K=2 Hq=Hkv=2 D=80 lengths self": (2, 2, 2, 2, 300, 80, True, True),
            "K=4 Hq=16 Hkv=2 D=256 lengths self": (1, 16, 2, 4, 600, 256, True, True),
        }
        for name, (b, hq, hkv, k, n, d, lengths, self_kv) in attention.items():
            out[f"attention {t} {name}"] = _attention_case(b, hq, hkv, k, n, d, dtype, lengths, self_kv)
    return out


def compile_launches(arch: int = 90, names: Sequence[str] | None = None) -> list[KernelBuild]:
    """Compile every launch of the :func:`cases` (or those named) for ``cuda:<arch>``.

    Raises ``RuntimeError`` under the interpreter, without Triton's NVIDIA backend, and when
    some kernel of an op was never launched by the cases (the check would miss it)."""
    if arch not in ARCHS:
        raise ValueError(f"tpo.kernels.compile_check: arch {arch} unknown; one of {sorted(ARCHS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "tpo.kernels.compile_check: TRITON_INTERPRET=1 is set, so the kernels are interpreted, not compiled; "
            "run it without TRITON_INTERPRET"
        )
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except ImportError as exc:
        raise RuntimeError(f"tpo.kernels.compile_check needs triton ({exc})") from exc
    if "nvidia" not in backends:
        raise RuntimeError("tpo.kernels.compile_check: this triton has no NVIDIA backend; install the PyPI wheel")
    _tool("ptxas"), _tool("cuobjdump")
    all_cases = cases()
    chosen = list(all_cases) if names is None else list(names)
    unknown = [n for n in chosen if n not in all_cases]
    if unknown:
        raise KeyError(f"tpo.kernels.compile_check: unknown cases {unknown}; known: {list(all_cases)}")
    builds: list[KernelBuild] = []
    current = [""]
    with _recording(arch, builds, current):
        for name in chosen:
            current[0] = name
            all_cases[name]()
    if names is None:
        kernels = {k for m in _OPS for k in _jit_kernels(importlib.import_module(m))}
        missed = sorted(kernels - {b.kernel for b in builds})
        if missed:
            raise RuntimeError(f"tpo.kernels.compile_check: no case launches {missed}; add one to cases()")
    return builds


def check_builds(builds: Sequence[KernelBuild]) -> list[str]:
    """What would fail or slow down on the GPU: shared memory over one program's limit, spills."""
    problems = []
    for b in builds:
        limit = ARCHS[b.arch].max_shared_per_block
        where = f"{b.kernel} [{b.case}] on sm_{b.arch}"
        if b.shared_bytes > limit:
            problems.append(f"{where}: {b.shared_bytes} bytes of shared memory, over the {limit} one program may have")
        if b.spill_bytes:
            problems.append(
                f"{where}: spills {b.spill_bytes} bytes per thread to local memory ({b.registers} registers)")
        if b.programs_per_sm < 1:
            problems.append(f"{where}: no program fits on an SM ({b.registers} registers x {b.threads} threads)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpo.kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help=f"compute capabilities, of {sorted(ARCHS)}")
    parser.add_argument("--csv", help="also write every build to this CSV file")
    args = parser.parse_args(argv)
    builds: list[KernelBuild] = []
    try:
        for arch in args.arch:
            builds += compile_launches(arch)
    except (RuntimeError, ValueError, KeyError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{'arch':>5} {'kernel':<22} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>7} {'per SM':>6} "
          f"{'MMA':>5}  case")
    for b in builds:
        print(f"{b.arch:>5} {b.kernel:<22} {b.num_warps:>5} {b.num_stages:>6} {b.registers:>4} {b.spill_bytes:>5} "
              f"{b.shared_bytes:>7} {b.programs_per_sm:>6} {b.tensor_cores:>5}  {b.case}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            fields = [f.name for f in dataclasses.fields(KernelBuild)]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(dataclasses.asdict(b) for b in builds)
    problems = check_builds(builds)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(builds)} launches compiled for sm_{', sm_'.join(map(str, args.arch))}: "
          f"{'no problems' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
