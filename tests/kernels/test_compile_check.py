"""The Triton kernels compile for the GPUs they are meant for, on this CPU machine.

``tpo.kernels.compile_check`` compiles every launch the ops make (their own launch code, on
CPU tensors) for ``cuda:<arch>`` with Triton's ``ptxas`` and reads registers, spills and
shared memory. It runs in a subprocess: the test session interprets the kernels
(``TRITON_INTERPRET=1``), and an interpreted kernel cannot be compiled.
"""
import csv
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")


def _nvidia_tools() -> bool:
    try:
        from triton import knobs
        from triton.backends import backends

        return "nvidia" in backends and os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _nvidia_tools(), reason="triton without its NVIDIA backend and ptxas")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_every_launch_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "sm90.csv"
    proc = subprocess.run([sys.executable, "-m", "tpo.kernels.compile_check", "--arch", "90", "--csv", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no problems" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_logprob_fwd_kernel", "_logprob_dz_kernel", "_fwd_split_kernel", "_fwd_merge_kernel",
                       "_bwd_split_kernel", "_bwd_finalize_kernel"}
    for dtype in ("bfloat16", "float16", "float32"):
        assert {r["kernel"] for r in rows if dtype in r["case"]} == kernels, dtype
    for r in rows:
        assert int(r["spill_bytes"]) == 0 and int(r["programs_per_sm"]) >= 1, r
        assert int(r["shared_bytes"]) <= 232448, r
    # bf16 / fp16 matmuls on tensor cores: the log-prob kernels (compute-bound) with Hopper's wgmma,
    # the attention's split kernels with wgmma or, for few query rows, mma; fp32 stays IEEE (no TF32)
    for r in rows:
        low = "float32" not in r["case"]
        if r["kernel"].startswith("_logprob"):
            assert r["tensor_cores"] == ("wgmma" if low else "-"), r
        elif "split" in r["kernel"]:
            assert (r["tensor_cores"] in ("wgmma", "mma")) if low else r["tensor_cores"] == "-", r
    # the GPU launch settings, not the interpreter's small tiles
    logprob = [r for r in rows if r["kernel"] == "_logprob_fwd_kernel"]
    assert all(r["num_warps"] == "8" and "BLOCK_N=64 BLOCK_V=128" in r["signature"] for r in logprob), logprob


def test_a_launch_over_the_shared_memory_limit_is_reported():
    """Tiles too large for one program (128 x 256 keys of head dim 256 over 4 stages) must fail the
    check on sm_80: the GPU would raise OutOfResources at launch, the interpreter never does."""
    proc = _python("""
        import importlib
        from tpo.kernels import compile_check as cc
        att = importlib.import_module("tpo.kernels.task_token_attention")  # the module, not the function
        att._config = lambda kind, n_rows, head_dim, dtype: att._Config(128, 256, 256, 8, 4, 16)
        name = "attention bfloat16 K=4 Hq=16 Hkv=2 D=256 lengths self"
        builds = cc.compile_launches(80, [name])
        for p in cc.check_builds(builds):
            print("PROBLEM", p)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_fwd_split_kernel" in proc.stdout and "shared memory, over the 166912" in proc.stdout, proc.stdout


def test_check_builds_names_spills_and_limits():
    from tpo.kernels.compile_check import KernelBuild, check_builds

    ok = KernelBuild("k", "case", 90, "", 4, 3, 128, 0, 1024, 2)
    spill = KernelBuild("k", "case", 90, "", 8, 3, 255, 64, 1024, 1)
    big = KernelBuild("k", "case", 86, "", 4, 3, 64, 0, 110000, 0)
    assert check_builds([ok]) == []
    problems = check_builds([spill, big])
    assert any("spills 64 bytes" in p and "sm_90" in p for p in problems)
    assert any("110000 bytes of shared memory, over the 101376" in p for p in problems)
    assert any("no program fits" in p and "sm_86" in p for p in problems)


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "tpo.kernels.compile_check"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET=1 is set" in proc.stderr
