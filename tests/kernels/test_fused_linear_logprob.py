"""fused_linear_logprob against a float64 eager reference (Apple ml-cross-entropy's
rule: the kernel's error is bounded by a small multiple of the error eager torch
makes in the same precision), on odd shapes with ignored labels, for both
backends (Triton under the interpreter on CPU), every reduction, temperature,
bias, and the gradients of hidden, weight and bias."""
import pytest
import torch

from tpo.kernels.fused_linear_logprob import (
    LogProbs,
    _resolve_backend,
    fused_linear_logprob,
    reference_linear_logprob,
)

BACKENDS = ["torch", "triton"]


def _problem(shape, hidden_size, vocab, bias=True, dtype=torch.float32, device="cpu", scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    if len(shape) == 2:  # prompt masked at the start, padding at the end, one sequence fully masked
        labels[0, :3] = -100
        labels[-1, -4:] = -100
        if shape[0] > 2:
            labels[1, :] = -100
    else:
        labels[::5] = -100
    to = dict(dtype=dtype, device=device)
    return hidden.to(**to), weight.to(**to), (None if b is None else b.to(**to)), labels.to(device)


def _grads(fn, hidden, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(*leaves)
    (out.logps.double() * upstream).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def _assert_bounded(name, fused, eager, ref, factor=4.0):
    """|fused - ref| <= factor * |eager - ref| (+ a floor at fp32 resolution of the values)."""
    err_fused = _max_err(fused, ref)
    err_eager = _max_err(eager, ref)
    floor = 2.0 ** -21 * max(1.0, ref.double().abs().max().item())
    assert err_fused <= factor * err_eager + floor, (
        f"{name}: fused error {err_fused:.3e} > {factor} x eager fp32 error {err_eager:.3e} (+{floor:.1e})"
    )


def _compare_to_reference(backend, hidden, weight, bias, labels, reduction, temperature, chunk_size=None):
    kw = dict(ignore_index=-100, temperature=temperature, reduction=reduction)

    def fused(h, w, b=None):
        return fused_linear_logprob(h, w, labels, b, backend=backend, chunk_size=chunk_size, **kw)

    def eager(h, w, b=None):
        return reference_linear_logprob(h, w, labels, b, **kw)

    probe = reference_linear_logprob(hidden.double(), weight.double(), labels, None, reduction=reduction).logps
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    out_f, grads_f = _grads(fused, hidden, weight, bias, upstream)
    out_e, grads_e = _grads(eager, hidden, weight, bias, upstream)
    as64 = (None if bias is None else bias.double(),)
    out_r, grads_r = _grads(eager, hidden.double(), weight.double(), as64[0], upstream)

    assert isinstance(out_f, LogProbs)
    assert out_f.logps.dtype == torch.float32 and out_f.logps.shape == out_r.logps.shape
    assert torch.equal(out_f.counts, out_r.counts) and out_f.counts.dtype == torch.int64
    _assert_bounded("logps", out_f.logps, out_e.logps, out_r.logps)
    for name, gf, ge, gr in zip(("d_hidden", "d_weight", "d_bias"), grads_f, grads_e, grads_r):
        assert gf.dtype == hidden.dtype
        _assert_bounded(name, gf, ge, gr)
    return out_f, out_r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature,bias", [(1.0, True), (0.7, False)])
def test_matches_float64_reference_3d(backend, reduction, temperature, bias):
    hidden, weight, b, labels = _problem((3, 7), hidden_size=45, vocab=101, bias=bias)
    out, ref = _compare_to_reference(backend, hidden, weight, b, labels, reduction, temperature)
    assert out.logps.shape == ((3, 7) if reduction == "none" else (3,))
    assert out.counts.tolist() == [4, 0, 3]
    if reduction == "none":
        assert torch.all(out.logps[labels == -100] == 0)
    if reduction == "mean":  # the fully masked sequence has mean 0, not NaN
        assert out.logps[1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_flat_input_is_one_sequence(backend, reduction):
    hidden, weight, b, labels = _problem((37,), hidden_size=33, vocab=75, bias=True, seed=3)
    out, _ = _compare_to_reference(backend, hidden, weight, b, labels, reduction, temperature=1.3)
    n_valid = int((labels != -100).sum())
    assert out.counts.shape == () and out.counts.item() == n_valid
    if reduction == "none":
        assert out.logps.shape == (37,)
    else:
        assert out.logps.shape == ()
        token = fused_linear_logprob(hidden, weight, labels, b, temperature=1.3, reduction="none", backend=backend).logps
        expected = token.sum() if reduction == "sum" else token.sum() / n_valid
        torch.testing.assert_close(out.logps, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_torch_backend_chunking_does_not_change_results(chunk_size):
    hidden, weight, b, labels = _problem((2, 11), hidden_size=20, vocab=57, seed=5)
    _compare_to_reference("torch", hidden, weight, b, labels, "sum", 1.0, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction,temperature", [("sum", 1.0), ("none", 0.8)])
def test_torch_backward_over_vocabulary_tiles_and_row_blocks(reduction, temperature):
    """fp32 backward of the torch backend: with chunk_size 2 over 1031 words the tiles are 8 rows by 257
    columns (the last 3 wide), so labels fall in every tile, rows come in blocks (the last partial)
    and ignored rows are left out; values and gradients still match the float64 reference."""
    hidden, weight, b, labels = _problem((3, 40), hidden_size=24, vocab=1031, bias=True, seed=9)
    assert (labels == -100).any() and len({int(x) // 257 for x in labels[labels >= 0]}) >= 4
    _compare_to_reference("torch", hidden, weight, b, labels, reduction, temperature, chunk_size=2)


def test_triton_splits_vocabulary_and_chunks_rows():
    # 16-row tiles, 32-column tiles: 2 row tiles and 7 vocabulary tiles, so the forward
    # splits V across programs and merges the partial log-sum-exps; the backward goes over
    # chunks of 7 rows (the last one partial).
    hidden, weight, b, labels = _problem((29,), hidden_size=17, vocab=211, seed=7)
    _compare_to_reference("triton", hidden, weight, b, labels, "none", 0.9, chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_agree_and_ignore_index_can_be_a_token_id(backend):
    hidden, weight, b, labels = _problem((2, 9), hidden_size=24, vocab=40, seed=11)
    labels = labels.clamp(min=0)
    labels[0, :2] = 7  # "pad id 7": every label 7 is ignored
    out = fused_linear_logprob(hidden, weight, labels, b, ignore_index=7, reduction="none", backend=backend)
    ref = reference_linear_logprob(hidden.double(), weight.double(), labels, b.double(), ignore_index=7, reduction="none")
    assert torch.all(out.logps[labels == 7] == 0)
    torch.testing.assert_close(out.logps.double(), ref.logps, rtol=0, atol=1e-5)
    assert out.counts.tolist() == (labels != 7).sum(1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_asked(backend):
    hidden, weight, b, labels = _problem((2, 6), hidden_size=16, vocab=35, seed=2)
    hidden.requires_grad_(True)
    out = fused_linear_logprob(hidden, weight, labels, b, backend=backend)
    out.logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None
    ref_h = hidden.detach().double().requires_grad_(True)
    reference_linear_logprob(ref_h, weight.double(), labels, b.double()).logps.sum().backward()
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, rtol=0, atol=1e-5)
    # ignored positions get exactly zero gradient
    assert torch.all(hidden.grad[labels == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_token_gives_zeros_and_zero_gradients(backend):
    hidden, weight, b, labels = _problem((2, 4), hidden_size=16, vocab=33)
    labels[:] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_logprob(h, w, labels, b, reduction="mean", backend=backend)
    assert out.logps.tolist() == [0.0, 0.0] and out.counts.tolist() == [0, 0]
    out.logps.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_bias_is_read_as_its_values(backend):
    """A bias that is a view with stride 2 (a column of a packed tensor): the kernels read it by its values,
    and its gradient reaches the packed tensor's column."""
    hidden, weight, b, labels = _problem((3, 7), hidden_size=24, vocab=45)
    packed = torch.stack([b, torch.full_like(b, 9.0)], dim=1).requires_grad_(True)
    assert packed[:, 0].stride() == (2,)
    out = fused_linear_logprob(hidden, weight, labels, packed[:, 0], reduction="sum", backend=backend)
    out.logps.sum().backward()
    leaf = b.clone().requires_grad_(True)
    ref = reference_linear_logprob(hidden.double(), weight.double(), labels, leaf.double(), reduction="sum")
    ref.logps.sum().backward()
    assert torch.allclose(out.logps.double(), ref.logps, atol=1e-4)
    assert torch.allclose(packed.grad[:, 0].double(), leaf.grad.double(), atol=1e-4)
    assert torch.all(packed.grad[:, 1] == 0)


def test_float64_log_probs_stay_float64_when_every_label_is_ignored():
    hidden, weight, b, labels = _problem((2, 4), hidden_size=16, vocab=33, dtype=torch.float64)
    labels[:] = -100
    for reduction in ("none", "sum", "mean"):
        for flat in (False, True):
            h, lab = (hidden.reshape(-1, 16), labels.reshape(-1)) if flat else (hidden, labels)
            out = fused_linear_logprob(h, weight, lab, b, reduction=reduction, backend="torch")
            assert out.logps.dtype == torch.float64, (reduction, flat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_logits_for_backward(backend):
    """The graph keeps O(N) state beyond the inputs: nothing of N x V elements is saved."""
    n, hidden_size, vocab = 40, 16, 97
    hidden, weight, b, labels = _problem((n,), hidden_size=hidden_size, vocab=vocab)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_linear_logprob(hidden, weight, labels, b)
    assert max(saved) >= n * vocab  # the probe does see the eager graph's logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_linear_logprob(hidden, weight, labels, b, backend=backend)
    assert max(saved) <= max(n * hidden_size, vocab * hidden_size) < n * vocab
    out.logps.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_scalar_without_grad_and_with_frozen_head(backend):
    """[N, H] input with sum/mean is one scalar: the torch backend computes its gradients in
    the forward pass. Under no_grad nothing is kept; a frozen head gets no gradient."""
    hidden, weight, b, labels = _problem((23,), hidden_size=19, vocab=41, seed=9)
    ref = reference_linear_logprob(hidden.double(), weight.double(), labels, b.double(), reduction="mean").logps
    with torch.no_grad():
        out = fused_linear_logprob(hidden.requires_grad_(True), weight, labels, b, reduction="mean", backend=backend)
    assert out.logps.grad_fn is None
    torch.testing.assert_close(out.logps.double(), ref, rtol=0, atol=1e-5)
    out = fused_linear_logprob(hidden, weight, labels, b, reduction="mean", backend=backend)
    (3.0 * out.logps).backward()
    ref_h = hidden.detach().double().requires_grad_(True)
    (3.0 * reference_linear_logprob(ref_h, weight.double(), labels, b.double(), reduction="mean").logps).backward()
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, rtol=0, atol=1e-5)
    assert weight.grad is None and b.grad is None


def test_auto_picks_torch_on_cpu():
    hidden = torch.zeros(2, 3)
    assert _resolve_backend("auto", hidden) == "torch"


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels_shape=(2, 5)), ValueError, "labels shape"),
        (dict(weight_shape=(11, 7)), ValueError, "hidden size mismatch"),
        (dict(label_value=11), ValueError, r"labels\[1, 2\] = 11 is outside the vocabulary \[0, 11\)"),
        (dict(label_value=-5), ValueError, "is not ignore_index=-100"),
        (dict(weight_dtype=torch.float64), TypeError, "dtype mismatch"),
        (dict(bias_shape=(10,)), ValueError, r"bias must be \[V\]"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(labels_dtype=torch.float32), TypeError, "integer token ids"),
        (dict(hidden_shape=(2, 2, 3, 6)), ValueError, r"hidden must be \[N, H\] or \[B, T, H\]"),
        (dict(low_precision_triton=True), TypeError, "runs float32 only"),
    ],
)
def test_bad_input_is_named(change, error, match):
    hidden = torch.randn(*change.get("hidden_shape", (2, 4, 6)))
    weight = torch.randn(*change.get("weight_shape", (11, 6)), dtype=change.get("weight_dtype", torch.float32))
    labels = torch.randint(0, 11, change.get("labels_shape", hidden.shape[:-1]))
    if "labels_dtype" in change:
        labels = labels.to(change["labels_dtype"])
    if "label_value" in change:
        labels[1, 2] = change["label_value"]
    bias = torch.randn(*change["bias_shape"]) if "bias_shape" in change else None
    kw = {k: change[k] for k in ("temperature", "reduction", "backend", "chunk_size") if k in change}
    if change.get("low_precision_triton"):
        hidden, weight, kw = hidden.bfloat16(), weight.bfloat16(), dict(backend="triton")
    with pytest.raises(error, match=match):
        fused_linear_logprob(hidden, weight, labels, bias, **kw)


# ----------------------------------------------------------------------------------------
# GPU: low precision and large shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_low_precision_large_shapes(backend, dtype):
    hidden, weight, b, labels = _problem((4, 509), hidden_size=1031, vocab=32003, dtype=dtype, device="cuda", scale=0.05)
    upstream = torch.randn(4, device="cuda", dtype=torch.float64)

    def fused(h, w, bb):
        return fused_linear_logprob(h, w, labels, bb, backend=backend)

    def eager(h, w, bb):
        return reference_linear_logprob(h, w, labels, bb)

    out_f, grads_f = _grads(fused, hidden, weight, b, upstream)
    out_e, grads_e = _grads(eager, hidden, weight, b, upstream)
    out_r, grads_r = _grads(eager, hidden.double(), weight.double(), b.double(), upstream)
    # Compare with eager torch in the same precision (bf16/fp16 logits, fp32 log-softmax).
    _assert_bounded("logps", out_f.logps, out_e.logps, out_r.logps, factor=2.0)
    for name, gf, ge, gr in zip(("d_hidden", "d_weight", "d_bias"), grads_f, grads_e, grads_r):
        assert gf.dtype == dtype
        _assert_bounded(name, gf, ge, gr, factor=2.0)


@pytest.mark.gpu
def test_gpu_peak_memory_far_below_eager():
    n, hidden_size, vocab = 8192, 2048, 65536
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)

    def peak(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, labels).logps.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda h, w, y: fused_linear_logprob(h, w, y, backend="triton"))
    eager = peak(lambda h, w, y: reference_linear_logprob(h, w, y))
    assert fused * 4 < eager, (fused, eager)
