"""task_token_attention against a float64 reference written here (explicit mask over the
context and self keys, naive softmax), values and gradients, on odd shapes.

The error of each backend must stay within a small multiple of the error that eager fp32
(the same naive formulation in fp32) makes against the float64 reference. On CPU the Triton
kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32 only;
the bf16 / long-context cases are marked ``gpu``.
"""
import pytest
import torch
from tpo.kernels.task_token_attention import (
    _triton_backward,
    _triton_forward,
    task_token_attention,
    task_token_attention_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def naive_reference(q, k, v, k_self=None, v_self=None, kv_lengths=None, scale=None):
    """Explicit ``[B, 1, K, N + K]`` mask, GQA by repeating kv heads, softmax in the input dtype."""
    B, Hq, K, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    keys = k.repeat_interleave(group, dim=1)
    values = v.repeat_interleave(group, dim=1)
    ctx_ok = torch.ones(B, N, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        ctx_ok = torch.arange(N, device=q.device)[None] < torch.as_tensor(kv_lengths, device=q.device)[:, None]
    mask = ctx_ok[:, None, None, :].expand(B, 1, K, N)
    if k_self is not None:
        keys = torch.cat([keys, k_self.repeat_interleave(group, dim=1)], dim=2)
        values = torch.cat([values, v_self.repeat_interleave(group, dim=1)], dim=2)
        eye = torch.eye(K, dtype=torch.bool, device=q.device)[None, None].expand(B, 1, K, K)
        mask = torch.cat([mask, eye], dim=-1)
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def make_inputs(B, Hq, Hkv, K, N, D, with_self, dtype=torch.float32, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(1234 + B * 7 + N)
    shapes = [(B, Hq, K, D), (B, Hkv, N, D), (B, Hkv, N, D)]
    if with_self:
        shapes += [(B, Hkv, K, D), (B, Hkv, K, D)]
    tensors = [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    if not with_self:
        tensors += [None, None]
    return tensors


def max_err(x, ref):
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def check_against_reference(fn, inputs, kv_lengths, factor=4.0, floor=2e-6):
    """Values and gradients of ``fn`` vs float64, bounded by ``factor`` x eager fp32's error."""
    leaves = [t for t in inputs if t is not None]
    out = fn(*inputs, kv_lengths=kv_lengths)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = naive_reference(*ref_in, kv_lengths=kv_lengths)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t is not None], grad_out.double())

    eager_in = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    eager = naive_reference(*eager_in, kv_lengths=kv_lengths)
    eager_grads = torch.autograd.grad(eager, [t for t in eager_in if t is not None], grad_out.float())

    names = ["out", "dq", "dk", "dv", "dk_self", "dv_self"]
    for name, got, want, base in zip(names, (out, *grads), (ref, *ref_grads), (eager, *eager_grads)):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.dtype == inputs[0].dtype, f"{name}: dtype {got.dtype}"
        err, eager_err = max_err(got, want), max_err(base, want)
        bound = factor * eager_err + floor * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (eager fp32 error {eager_err:.3e})"


# (B, Hq, Hkv, K, N, D, kv_lengths): odd N, D not a power of two, GQA, lengths < N (incl. 0 / 1).
SHAPES = [
    pytest.param(3, 4, 2, 5, 37, 24, [37, 5, 0], id="gqa2-D24-N37-varlen"),
    pytest.param(2, 3, 3, 3, 19, 7, None, id="mha-D7-N19"),
    pytest.param(2, 8, 2, 5, 33, 12, [20, 33], id="gqa4-rows20-two-query-blocks"),
    pytest.param(1, 2, 1, 1, 5, 40, [3], id="K1-N5-D40"),
]


@pytest.mark.parametrize("with_self", [True, False], ids=["self", "no-self"])
@pytest.mark.parametrize("B,Hq,Hkv,K,N,D,lengths", SHAPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_float64_reference(backend, B, Hq, Hkv, K, N, D, lengths, with_self):
    if lengths is not None and not with_self:
        lengths = [max(1, n) for n in lengths]  # without k_self each query needs one context key
    inputs = make_inputs(B, Hq, Hkv, K, N, D, with_self)
    kv_lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)

    def fn(*args, kv_lengths):
        return task_token_attention(*args, kv_lengths=kv_lengths, backend=backend)

    check_against_reference(fn, inputs, kv_lengths)


@pytest.mark.parametrize("num_splits", [1, 2, 100])
def test_split_count_does_not_change_the_result(num_splits):
    """One chunk, a few, and one per key block (several empty for the short sample)."""
    B, Hq, Hkv, K, N, D = 2, 4, 2, 3, 45, 20
    q, k, v, ks, vs = make_inputs(B, Hq, Hkv, K, N, D, True)
    lengths = torch.tensor([45, 9], dtype=torch.int32, device=DEVICE)
    scale = D**-0.5
    with torch.no_grad():
        out, lse = _triton_forward(q, k, v, ks, vs, lengths, scale, num_splits=num_splits)
        dout = torch.randn_like(out)
        grads = _triton_backward(q, k, v, ks, vs, lengths, scale, out, lse, dout, num_splits=num_splits)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, ks, vs)]
    ref = naive_reference(*ref_in, kv_lengths=lengths)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    assert max_err(out, ref) < 2e-6
    # log-sum-exp saved for the backward (base 2) matches the reference's
    scores = torch.cat(
        [
            (ref_in[0] @ ref_in[1].repeat_interleave(2, 1).transpose(-1, -2) * scale).masked_fill(
                (torch.arange(N, device=DEVICE)[None] >= lengths[:, None].long())[:, None, None, :], float("-inf")
            ),
            (ref_in[0] * ref_in[3].repeat_interleave(2, 1)).sum(-1, keepdim=True) * scale,
        ],
        dim=-1,
    )
    ref_lse2 = torch.logsumexp(scores, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert max_err(lse, ref_lse2) < 2e-6
    for name, got, want in zip(["dq", "dk", "dv", "dk_self", "dv_self"], grads, ref_grads):
        assert max_err(got, want) < 5e-6, name
    # keys past a sample's length get exactly zero gradient
    assert grads[1][1, :, 9:].abs().max().item() == 0.0
    assert grads[2][1, :, 9:].abs().max().item() == 0.0


def test_strided_inputs_as_transformers_passes_them():
    """k, v as [B, L, H, D] buffers viewed as [B, H, L, D] and sliced (what the HF attention
    function hands over) give the same values and gradients as contiguous copies."""
    B, Hq, Hkv, K, L, D = 2, 4, 2, 3, 23, 12
    base = torch.randn(B, L + K, Hkv, 2, D, device=DEVICE)
    key = base[..., 0, :].transpose(1, 2).detach().requires_grad_()
    value = base[..., 1, :].transpose(1, 2).detach().requires_grad_()
    query = torch.randn(B, L + K, Hq, D, device=DEVICE).transpose(1, 2).detach().requires_grad_()
    lengths = torch.tensor([23, 11], device=DEVICE)
    args = (query[:, :, L:], key[:, :, :L], value[:, :, :L], key[:, :, L:], value[:, :, L:])
    assert not args[1].is_contiguous()
    out = task_token_attention(*args, kv_lengths=lengths, backend="triton")
    g = torch.autograd.grad(out.square().sum(), (query, key, value))
    contiguous = [a.detach().contiguous().double().requires_grad_() for a in args]
    ref = naive_reference(*contiguous, kv_lengths=lengths)
    assert max_err(out, ref) < 2e-6
    ref_q, ref_k, ref_v, ref_ks, ref_vs = torch.autograd.grad(ref.square().sum(), contiguous)
    assert max_err(g[0][:, :, L:], ref_q) < 1e-5
    assert max_err(g[1], torch.cat([ref_k, ref_ks], dim=2)) < 1e-5
    assert max_err(g[2], torch.cat([ref_v, ref_vs], dim=2)) < 1e-5
    assert g[0][:, :, :L].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_context_leaves_each_query_its_own_value(backend):
    """N == 0 with self keys: every task query attends to itself alone (GQA: its kv head's value)."""
    q, k, v, k_self, v_self = make_inputs(2, 4, 2, 3, 0, 8, with_self=True)
    out = task_token_attention(q, k, v, k_self, v_self, backend=backend)
    assert torch.allclose(out, v_self.detach().repeat_interleave(2, dim=1), atol=1e-6)
    out.sum().backward()
    assert q.grad.abs().max() < 1e-6 and torch.allclose(v_self.grad, torch.full_like(v_self, 2.0))


def test_triton_backward_refuses_to_be_differentiated_again():
    """The kernels' gradients carry no graph: a second derivative (a gradient penalty) raises instead of
    silently dropping the term."""
    q, k, v, k_self, v_self = make_inputs(1, 2, 1, 2, 5, 8, with_self=True)
    out = task_token_attention(q, k, v, k_self, v_self, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # its upstream gradient has a graph
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (out.sum() + dq.square().sum()).backward()


def test_task_queries_do_not_see_each_other():
    """Changing one task query's own key/value changes only that query's output."""
    q, k, v, ks, vs = (t.detach() for t in make_inputs(2, 4, 2, 4, 17, 12, True))
    out = task_token_attention(q, k, v, ks, vs, backend="triton")
    ks2, vs2 = ks.clone(), vs.clone()
    ks2[:, :, 2] += 3.0
    vs2[:, :, 2] -= 2.0
    out2 = task_token_attention(q, k, v, ks2, vs2, backend="triton")
    changed = (out2 - out).abs().amax(dim=(0, 1, 3))
    assert changed[2] > 1e-2
    assert torch.all(changed[[0, 1, 3]] == 0)


def test_torch_backend_float64_and_reference_agree():
    q, k, v, ks, vs = (t.detach().cpu().double() for t in make_inputs(2, 6, 3, 4, 29, 10, True, device="cpu"))
    lengths = torch.tensor([29, 3])
    want = naive_reference(q, k, v, ks, vs, kv_lengths=lengths)
    got = task_token_attention(q, k, v, ks, vs, kv_lengths=lengths)  # auto -> torch for float64 / CPU
    assert max_err(got, want) < 1e-12
    assert max_err(task_token_attention_reference(q, k, v, ks, vs, kv_lengths=lengths), want) < 1e-12
    assert max_err(task_token_attention(q, k, v, kv_lengths=lengths.tolist(), backend="torch"),
                   naive_reference(q, k, v, kv_lengths=lengths)) < 1e-12


def test_package_export_is_callable():
    """``from tpo.kernels import task_token_attention`` is the function, also after the
    same-named submodule has been imported."""
    import tpo.kernels.task_token_attention  # noqa: F401
    from tpo.kernels import task_token_attention as exported

    assert callable(exported) and exported.__name__ == "task_token_attention"

    q, k, v, ks, vs = (t.detach().cpu().double() for t in make_inputs(1, 2, 1, 2, 6, 4, True, device="cpu"))
    assert torch.equal(exported(q, k, v, ks, vs), task_token_attention(q, k, v, ks, vs))


def test_scale_argument():
    q, k, v, ks, vs = (t.detach() for t in make_inputs(1, 2, 2, 2, 9, 8, True))
    for backend in ("triton", "torch"):
        got = task_token_attention(q, k, v, ks, vs, scale=0.05, backend=backend)
        assert max_err(got, naive_reference(*(t.double() for t in (q, k, v, ks, vs)), scale=0.05)) < 2e-6


# ------------------------------------------------------------------------------------- errors
def _good(**over):
    base = dict(
        q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8),
        k_self=torch.randn(2, 2, 3, 8), v_self=torch.randn(2, 2, 3, 8),
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over,kwargs,exc,match",
    [
        (dict(q=torch.randn(2, 4, 8)), {}, ValueError, r"q must be 4-D"),
        (dict(q=torch.randn(2, 3, 3, 8)), {}, ValueError, r"multiple of the number of key/value heads"),
        (dict(v=torch.randn(2, 2, 6, 8)), {}, ValueError, r"same shape"),
        (dict(k=torch.randn(2, 2, 5, 6), v=torch.randn(2, 2, 5, 6)), {}, ValueError, r"head dim 8 but k has head dim 6"),
        (dict(k=torch.randn(3, 2, 5, 8), v=torch.randn(3, 2, 5, 8)), {}, ValueError, r"batch 2 but k has batch 3"),
        (dict(k_self=torch.randn(2, 2, 4, 8)), {}, ValueError, r"k_self must have shape \[B, Hkv, K, D\]"),
        (dict(v_self=None), {}, ValueError, r"both k_self and v_self"),
        (dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float64)), {}, TypeError, r"k has dtype torch.float64"),
        (dict(q=torch.randint(0, 3, (2, 4, 3, 8))), {}, TypeError, r"q must be a floating-point"),
        ({}, dict(kv_lengths=torch.tensor([5, 6])), ValueError, r"kv_lengths must lie in \[0, N=5\]"),
        ({}, dict(kv_lengths=torch.tensor([-1, 2])), ValueError, r"got values in \[-1, 2\]"),
        (dict(k_self=None, v_self=None), dict(kv_lengths=[0, 2]), ValueError, r"at least 1: without k_self"),
        ({}, dict(kv_lengths=torch.tensor([2])), ValueError, r"kv_lengths must have shape \[B\] = \[2\]"),
        ({}, dict(kv_lengths=torch.tensor([2.0, 3.0])), TypeError, r"kv_lengths must hold integers"),
        ({}, dict(backend="cuda"), ValueError, r"backend='cuda' is not one of"),
        ({}, dict(scale=float("nan")), ValueError, r"scale must be a finite number"),
        (dict(k=torch.randn(2, 2, 0, 8), v=torch.randn(2, 2, 0, 8), k_self=None, v_self=None), {}, ValueError,
         r"context k is empty"),
    ],
)
def test_bad_input_raises_clear_error(over, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        task_token_attention(**_good(**over), **kwargs)


def test_triton_backend_rejects_what_it_cannot_run():
    args = _good(**{name: t.double() for name, t in _good().items()})
    with pytest.raises(TypeError, match="use backend='torch'"):
        task_token_attention(**args, backend="triton")


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,Hq,Hkv,K,N,D,lengths",
    [
        (2, 32, 8, 8, 4099, 128, [4099, 1500]),
        (1, 12, 4, 5, 33001, 80, [33001]),
        (3, 28, 4, 16, 1027, 96, [1027, 0, 640]),  # G*K = 112 rows: several query blocks (atomics)
    ],
)
def test_gpu_low_precision_within_eager_error(dtype, B, Hq, Hkv, K, N, D, lengths):
    inputs = make_inputs(B, Hq, Hkv, K, N, D, True, dtype=dtype, device="cuda")
    kv_lengths = torch.tensor(lengths, device="cuda")
    leaves = [t for t in inputs]
    out = task_token_attention(*inputs, kv_lengths=kv_lengths, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = naive_reference(*ref_in, kv_lengths=kv_lengths)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    # eager in the same low precision: the plain SDPA formulation with an explicit mask
    eager_in = [t.detach().requires_grad_() for t in inputs]
    eager = task_token_attention_reference(*eager_in, kv_lengths=kv_lengths)
    eager_grads = torch.autograd.grad(eager, eager_in, grad_out)
    for name, got, want, base in zip(
        ["out", "dq", "dk", "dv", "dk_self", "dv_self"], (out, *grads), (ref, *ref_grads), (eager, *eager_grads)
    ):
        err, eager_err = max_err(got, want), max_err(base, want)
        assert err <= 3.0 * eager_err + 1e-3 * max(1.0, want.abs().max().item()), (name, err, eager_err)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    inputs = make_inputs(2, 16, 4, 8, 2051, 64, True, device="cuda")
    kv_lengths = torch.tensor([2051, 700], device="cuda")

    def fn(*args, kv_lengths):
        return task_token_attention(*args, kv_lengths=kv_lengths, backend="triton")

    check_against_reference(fn, inputs, kv_lengths, factor=4.0, floor=1e-5)
