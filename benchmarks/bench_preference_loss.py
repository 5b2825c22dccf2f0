"""Benchmark: the fused DPO loss with a reference model (LM head + log-probs +
sigmoid DPO, no logits) against Liger-Kernel's ``LigerFusedLinearDPOLoss`` and
eager torch, forward, backward and both.

Run (timings on; the project's pytest config disables them by default):

    pytest benchmarks/bench_preference_loss.py --benchmark-enable          # CPU set
    pytest benchmarks/bench_preference_loss.py --benchmark-enable -m gpu   # GPU set only
    python benchmarks/run_kernel_benchmarks.py                             # CSV + plots + peak memory

Case: 4 pairs of 512 tokens (policy hidden ``[8, 512, H]``, chosen then rejected), a
reference model given as its own hidden states and head (``ref_hidden``, ``ref_weight``),
``beta = 0.1``, summed log-probs. ``prompt`` is the share of each sequence masked with
``ignore_index`` (0: every position is a completion token; 0.5: the first half is prompt).

Providers:
* ``fused``  ``fused_linear_preference_loss(..., loss=DPOLoss(beta=0.1))``: backend ``torch`` on
  CPU, ``triton`` on GPU; reference log-probs under ``no_grad`` through the same kernel;
* ``liger``  ``LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)`` (torch.compile'd chunks of
  one pair; it computes the gradients inside its forward, so its "backward" is nearly free);
* ``eager``  materialised fp32 logits for policy and reference, log-softmax, gather, DPO (TRL).

Sets: CPU ``H=1024, V=32000`` fp32; GPU ``H=4096, V=128256`` bf16.
"""
from __future__ import annotations

import os

import benchkit
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tpo.kernels.fused_linear_logprob import reference_linear_logprob  # noqa: E402
from tpo.kernels.fused_linear_preference import fused_linear_preference_loss  # noqa: E402
from tpo.losses.preference import DPOLoss  # noqa: E402

CUDA = torch.cuda.is_available()
PAIRS, TOKENS, BETA = 4, 512, 0.1
CPU_SET = dict(H=1024, V=32000, dtype=torch.float32, device="cpu", prompts=(0.0, 0.5))
GPU_SET = dict(H=4096, V=128256, dtype=torch.bfloat16, device="cuda", prompts=(0.0, 0.5))
MODES = ("fwd", "bwd", "fwd+bwd")


def make_inputs(hidden_size: int, vocab: int, dtype=torch.float32, device="cpu", prompt: float = 0.0,
                pairs: int = PAIRS, tokens: int = TOKENS, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (2 * pairs, tokens)
    hidden = torch.randn(*shape, hidden_size, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    ref_hidden = torch.randn(*shape, hidden_size, generator=gen, device=device, dtype=dtype)
    ref_weight = torch.randn(vocab, hidden_size, generator=gen, device=device, dtype=dtype) * 0.02
    labels = torch.randint(0, vocab, shape, generator=gen, device=device)
    labels[:, : int(prompt * tokens)] = -100
    return dict(hidden=hidden, weight=weight, labels=labels, ref_hidden=ref_hidden, ref_weight=ref_weight)


_STATE = {}


def _fused(hidden, weight, labels, ref_hidden, ref_weight):
    loss_fn = _STATE.setdefault("dpo", DPOLoss(beta=BETA))
    backend = "triton" if hidden.is_cuda else "torch"
    loss, _ = fused_linear_preference_loss(hidden, weight, labels, loss=loss_fn, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, backend=backend)
    return loss


def _liger(hidden, weight, labels, ref_hidden, ref_weight):
    if "liger" not in _STATE:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _STATE["liger"] = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)
    return _STATE["liger"](weight, hidden, labels, None, ref_hidden, ref_weight)[0]


def _eager(hidden, weight, labels, ref_hidden, ref_weight):
    pairs = hidden.shape[0] // 2
    logps = reference_linear_logprob(hidden, weight, labels).logps
    with torch.no_grad():
        ref = reference_linear_logprob(ref_hidden, ref_weight, labels).logps
    d = (logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:])
    return -F.logsigmoid(BETA * d).mean()


PROVIDERS = {"fused": _fused, "eager": _eager, "liger": _liger}


def available(provider: str, device: str) -> tuple[bool, str]:
    if provider != "liger":
        return True, ""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False, "liger-kernel not installed (pip install -e .[bench])"
    return True, ""


def _cases(cfg):
    return [(provider, mode, prompt) for prompt in cfg["prompts"] for provider in PROVIDERS for mode in MODES]


def _bench(benchmark, cfg, provider, mode, prompt):
    benchkit.bench_provider(benchmark, PROVIDERS, available, provider, mode, cfg["device"],
                            lambda: make_inputs(cfg["H"], cfg["V"], cfg["dtype"], cfg["device"], prompt),
                            prompt=prompt, pairs=PAIRS, tokens=TOKENS, H=cfg["H"], V=cfg["V"], dtype=str(cfg["dtype"]))


@pytest.mark.parametrize("provider,mode,prompt", _cases(CPU_SET))
def test_cpu(benchmark, provider, mode, prompt):
    _bench(benchmark, CPU_SET, provider, mode, prompt)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider,mode,prompt", _cases(GPU_SET))
def test_gpu(benchmark, provider, mode, prompt):
    _bench(benchmark, GPU_SET, provider, mode, prompt)
