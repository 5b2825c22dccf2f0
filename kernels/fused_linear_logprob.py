"""Fused linear + log-softmax + gather: per-token log-probabilities of the
labels under ``softmax((hidden @ weight.T + bias) / temperature)``, without
ever building the ``[N, V]`` logits.

The op behind every log-prob in tpo (SFT's NLL, the per-sequence log-probs of
DPO and its relatives, PPO's per-token log-probs)::

    logp[n] = z[n, y[n]] / T - logsumexp_v(z[n, v] / T),   z = hidden @ weight.T + bias

Forward keeps O(N) state: the per-token log-sum-exp (fp32). Backward recomputes
the logits tile by tile from ``hidden``/``weight`` and forms

    d logp[n] / d z[n, v] = (1[v == y[n]] - softmax(z[n] / T)[v]) / T

on the fly, accumulating the gradients of ``hidden``, ``weight`` and ``bias``
in fp32. Ignored positions (``labels == ignore_index``) are dropped before any
matmul, so prompt and padding tokens cost nothing.

Backends (``backend=``):

* ``"triton"``: two Triton kernels in this file. The forward streams over
  V tiles with an online log-sum-exp and picks out the label logit (the V range
  is split across programs when N alone would leave the GPU idle, the partial
  log-sum-exps are merged on the host). The backward goes over chunks of rows:
  a kernel recomputes the chunk's logits tile by tile and writes
  ``dz = g/T * (onehot - softmax)`` for the chunk (``[chunk, V]`` in the inputs'
  dtype, tiles with a zero upstream gradient skip the matmul), then two GEMMs
  give ``dz @ W`` and add ``dz.T @ h`` into the fp32 weight gradient. On CPU the
  kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, fp32 only,
  for tests).
* ``"torch"``: the same algorithm with plain matmuls and one reused buffer of
  ``chunk x V`` elements (for CPU users and as the fallback): the forward in
  chunks of rows; the backward of fp32/fp64 inputs over tiles of the vocabulary
  (all rows with a nonzero upstream gradient at once where the buffer allows),
  so that each tile's rows of the weight gradient are written once, that of
  bf16/fp16 inputs in chunks of rows.
* ``"auto"``: ``"triton"`` for CUDA tensors when Triton is available, else
  ``"torch"``.

>>> out = fused_linear_logprob(hidden, lm_head.weight, labels)   # [B, T, H], [V, H], [B, T]
>>> out.logps, out.counts                                        # [B] summed log-probs, [B] token counts
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

try:  # Triton is optional (not on every platform); the torch backend needs none of it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["LogProbs", "fused_linear_logprob", "reference_linear_logprob", "BACKENDS", "REDUCTIONS"]

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("none", "sum", "mean")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The torch backend's [chunk, V] work buffer, in elements (fp32): 32 MiB on CPU,
# where the matmuls are efficient from a few hundred rows on, and 1 GiB on GPUs.
_CPU_CHUNK_ELEMENTS = 1 << 23
_GPU_CHUNK_ELEMENTS = 1 << 28


class LogProbs(NamedTuple):
    """What :func:`fused_linear_logprob` returns.

    ``logps`` (fp32): per-token log-probs shaped like ``labels`` (0 at ignored
    positions) for ``reduction="none"``; else per-sequence sums or means, ``[B]``
    for ``[B, T, H]`` input and a 0-dim scalar (all N tokens as one sequence)
    for ``[N, H]`` input. ``counts`` (int64): the number of non-ignored tokens,
    per sequence (``[B]``) or in total (0-dim) for ``[N, H]`` input, whatever
    the reduction. A mean over zero tokens is 0.
    """

    logps: torch.Tensor
    counts: torch.Tensor


# --------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, reduction, backend, chunk_size):
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"fused_linear_logprob: {name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"fused_linear_logprob: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"fused_linear_logprob: hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}; "
            "flatten extra leading dimensions first"
        )
    if weight.dim() != 2:
        raise ValueError(f"fused_linear_logprob: weight must be [V, H] (the LM head's weight), got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(
            f"fused_linear_logprob: hidden size mismatch: hidden has H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) "
            f"but weight is [V, H] = {tuple(weight.shape)}; pass the LM head weight, not its transpose"
        )
    if V == 0 or H == 0:
        raise ValueError(f"fused_linear_logprob: weight must have V > 0 and H > 0, got shape {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"fused_linear_logprob: labels shape {tuple(labels.shape)} does not match hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}; labels must be aligned with hidden (shift them before calling: "
            "hidden[:, :-1] predicts labels[:, 1:])"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"fused_linear_logprob: labels must hold integer token ids, got dtype {labels.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fused_linear_logprob: hidden must be float32, bfloat16, float16 (or float64 on the torch backend), "
            f"got {hidden.dtype}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"fused_linear_logprob: dtype mismatch: hidden is {hidden.dtype} but weight is {weight.dtype}; "
            "cast one of them (e.g. hidden.to(weight.dtype))"
        )
    if bias is not None:
        if tuple(bias.shape) != (V,):
            raise ValueError(f"fused_linear_logprob: bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"fused_linear_logprob: dtype mismatch: bias is {bias.dtype} but hidden is {hidden.dtype}")
    devices = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(
            f"fused_linear_logprob: hidden, weight, labels (and bias) must be on one device, got {sorted(map(str, devices))}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"fused_linear_logprob: ignore_index must be an int, got {ignore_index!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"fused_linear_logprob: temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fused_linear_logprob: temperature must be finite and > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_logprob: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear_logprob: backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"fused_linear_logprob: chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_label_range(labels: torch.Tensor, valid: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[position])
        where = ", ".join(map(str, position))
        raise ValueError(
            f"fused_linear_logprob: labels[{where}] = {value} is outside the vocabulary [0, {vocab}) "
            f"(weight.shape[0] = {vocab}) and is not ignore_index={ignore_index}; set positions to skip "
            f"to ignore_index, or pass the matching ignore_index"
        )


def _interpreting() -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_logprob_fwd_kernel, InterpretedFunction)


def _resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend == "auto":
        # (fp64 is the torch backend's: the kernels compute in fp32)
        return "triton" if (triton is not None and hidden.is_cuda and hidden.dtype in _TRITON_DTYPES) else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("fused_linear_logprob: backend='triton' but triton is not installed; use backend='torch'")
        if hidden.is_cuda:
            if _interpreting():
                raise RuntimeError(
                    "fused_linear_logprob: TRITON_INTERPRET=1 is set but the tensors are on CUDA; the interpreter runs "
                    "CPU tensors only: unset TRITON_INTERPRET or move the tensors to the CPU"
                )
        elif not _interpreting():
            raise RuntimeError(
                f"fused_linear_logprob: backend='triton' needs CUDA tensors, got {hidden.device}; use backend='torch' "
                "on CPU (or set TRITON_INTERPRET=1 before importing triton to debug the kernels on CPU)"
            )
        if hidden.dtype not in _TRITON_DTYPES:
            raise TypeError(f"fused_linear_logprob: backend='triton' supports float32/bfloat16/float16, got {hidden.dtype}")
        if not hidden.is_cuda and hidden.dtype != torch.float32:
            raise TypeError(
                f"fused_linear_logprob: the Triton interpreter (TRITON_INTERPRET=1) runs float32 only, got {hidden.dtype}; "
                "use backend='torch' for low precision on CPU"
            )
    return backend


# --------------------------------------------------------------------------------------
# Torch backend: chunks of rows, one [chunk, V] buffer reused in place
# --------------------------------------------------------------------------------------
def _default_chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = _GPU_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS
    rows = max(16, (budget // vocab) // 16 * 16)
    return max(1, min(rows, n_rows))


class _ChunkLogits:
    """Computes ``(h[i:j] @ W.T + b) * inv_temp`` into one reused fp32 buffer."""

    def __init__(self, hidden, weight, bias, inv_temp, chunk):
        self.hidden, self.weight, self.bias, self.inv_temp = hidden, weight, bias, inv_temp
        rows = min(chunk, hidden.shape[0])
        vocab = weight.shape[0]
        self.buf = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
        wide = hidden.dtype in (torch.float32, torch.float64)
        self.wide = self.buf if wide else torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)

    def __call__(self, i: int, j: int) -> torch.Tensor:
        out = self.buf[: j - i]
        if self.bias is None:
            torch.mm(self.hidden[i:j], self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, self.hidden[i:j], self.weight.t(), out=out)
        z = self.wide[: j - i]
        if z.data_ptr() != out.data_ptr():
            z.copy_(out)
        if self.inv_temp != 1.0:
            z.mul_(self.inv_temp)
        return z


def _torch_forward(hidden, weight, bias, labels, inv_temp, chunk):
    n = hidden.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lse = torch.empty(n, dtype=acc_dtype, device=hidden.device)
    label_logit = torch.empty(n, dtype=acc_dtype, device=hidden.device)
    logits = _ChunkLogits(hidden, weight, bias, inv_temp, chunk)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        z = logits(i, j)
        label_logit[i:j] = z.gather(1, labels[i:j, None]).squeeze(1)
        m = z.amax(1, keepdim=True)
        z.sub_(m).exp_()
        torch.log(z.sum(1), out=lse[i:j])
        lse[i:j] += m.squeeze(1)
    return lse, label_logit


def _addmm_fp32(grad_w, dz_t, h_chunk):
    """grad_w (fp32) += dz_t @ h_chunk for bf16/fp16 operands, accumulating in fp32."""
    if h_chunk.is_cuda:
        try:  # cuBLAS low-precision GEMM with an fp32 output (torch >= 2.8)
            torch.addmm(grad_w, dz_t, h_chunk, out_dtype=torch.float32, out=grad_w)
            return
        except (TypeError, RuntimeError):
            pass
    grad_w.addmm_(dz_t.to(grad_w.dtype), h_chunk.to(grad_w.dtype))


def _accumulate_grads(dz, i, j, hidden, weight, grad_h, grad_w, grad_b):
    """Adds the gradients of rows [i, j) given their dz = d out / d (logits): dz @ W into
    grad_h (one GEMM over the whole vocabulary, in the inputs' dtype), dz.T @ h into the fp32
    (fp64) grad_w, and the column sums of dz into grad_b."""
    dz_mm = dz if dz.dtype == hidden.dtype else dz.to(hidden.dtype)
    if grad_h is not None:
        torch.mm(dz_mm, weight, out=grad_h[i:j])
    if grad_w is not None:
        h_chunk = hidden[i:j]
        if h_chunk.dtype == grad_w.dtype:
            grad_w.addmm_(dz.t() if dz.dtype == grad_w.dtype else dz.t().to(grad_w.dtype), h_chunk)
        else:
            _addmm_fp32(grad_w, (dz_mm if h_chunk.is_cuda else dz).t(), h_chunk)
    if grad_b is not None:
        grad_b += dz.sum(0, dtype=grad_b.dtype)


def _grad_buffers(hidden, weight, needs, zero_weight=True):
    """The gradient buffers ``needs`` asks for, zero-filled (the weight's left uninitialised with
    ``zero_weight=False``, for a caller that writes every row)."""
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    vocab, h_size = weight.shape
    grad_h = torch.zeros_like(hidden) if needs[0] else None
    new = torch.zeros if zero_weight else torch.empty
    grad_w = new(vocab, h_size, dtype=acc_dtype, device=hidden.device) if needs[1] else None
    grad_b = torch.zeros(vocab, dtype=acc_dtype, device=hidden.device) if needs[2] else None
    return grad_h, grad_w, grad_b


def _torch_backward(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs):
    if hidden.dtype in (torch.float32, torch.float64):
        return _torch_backward_vocab_tiles(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs)
    return _torch_backward_row_chunks(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs)


def _torch_backward_vocab_tiles(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs):
    """The recomputing backward for fp32/fp64 inputs, over tiles of the vocabulary: the log-sum-exps
    are known, so a tile of columns needs no other. Each tile's rows of the weight gradient are
    written once (row chunks would read and write the whole fp32 weight gradient once per chunk),
    and only the rows with a nonzero upstream gradient (not ignored, not masked) are computed. The
    tile (rows x columns) has the element budget of ``chunk`` rows over the whole vocabulary; rows
    come in blocks only when there are too many for tiles of 256 columns."""
    n, vocab = hidden.shape[0], weight.shape[0]
    active = (gscaled != 0).nonzero().squeeze(1)
    # the first row block writes every row of the weight gradient (no zero fill needed) when any row is active
    grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, needs, zero_weight=active.numel() == 0)
    if active.numel() == 0:
        return grad_h, grad_w, grad_b
    every = active.numel() == n
    h, g, lab, lse = (hidden, gscaled, labels, lse) if every else \
        (hidden.index_select(0, active), gscaled[active], labels[active], lse[active])
    m = h.shape[0]
    grad_rows = None if grad_h is None else (grad_h if every else torch.zeros_like(h))
    budget = max(chunk, 1) * vocab
    rows = min(m, max(chunk, budget // 256))
    width = max(1, budget // rows)
    buf = torch.empty(rows * min(width, vocab), dtype=hidden.dtype, device=hidden.device)
    for i in range(0, m, rows):
        j = min(i + rows, m)
        h_i, g_i, lse_i, lab_i = h[i:j], g[i:j], lse[i:j, None], lab[i:j]
        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            z = buf[: (j - i) * (v1 - v0)].view(j - i, v1 - v0)
            if bias is None:
                torch.mm(h_i, weight[v0:v1].t(), out=z)
            else:
                torch.addmm(bias[v0:v1], h_i, weight[v0:v1].t(), out=z)
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            z.sub_(lse_i).exp_().mul_(g_i.neg()[:, None])  # -g/T * softmax
            hit = ((lab_i >= v0) & (lab_i < v1)).nonzero().squeeze(1)
            if hit.numel():  # + g/T at the label
                z.index_put_((hit, lab_i[hit] - v0), g_i[hit], accumulate=True)
            if grad_rows is not None:
                grad_rows[i:j].addmm_(z, weight[v0:v1])
            if grad_w is not None:
                if i == 0:
                    torch.mm(z.t(), h_i, out=grad_w[v0:v1])
                else:
                    grad_w[v0:v1].addmm_(z.t(), h_i)
            if grad_b is not None:
                grad_b[v0:v1] += z.sum(0)
    if grad_h is not None and not every:
        grad_h.index_copy_(0, active, grad_rows)
    return grad_h, grad_w, grad_b


def _torch_backward_row_chunks(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs):
    """The recomputing backward for bf16/fp16 inputs, over chunks of rows: each row's hidden
    gradient is one GEMM over the whole vocabulary (accumulated in fp32 inside it)."""
    n = hidden.shape[0]
    grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, needs)
    logits = _ChunkLogits(hidden, weight, bias, inv_temp, chunk)
    on_cpu = hidden.device.type == "cpu"
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        g = gscaled[i:j]
        if on_cpu and not bool(g.any()):  # a zero upstream gradient contributes nothing
            continue
        dz = logits(i, j)                       # recomputed logits / T
        dz.sub_(lse[i:j, None]).exp_()          # softmax
        dz.mul_(g[:, None].neg())               # -g/T * p
        dz.scatter_add_(1, labels[i:j, None], g[:, None])  # + g/T at the label
        _accumulate_grads(dz, i, j, hidden, weight, grad_h, grad_w, grad_b)
    return grad_h, grad_w, grad_b


def torch_logprob_grad_pass(hidden, weight, bias, labels, inv_temp, bounds, row_grad, needs):
    """Forward and backward in one pass, for when the upstream gradient is known as soon
    as the log-probs are: for each row range ``[i, j)`` of ``bounds`` (which may be empty),
    the logits of those rows (one reused ``[rows, V]`` buffer), their per-token log-probs,
    ``row_grad(k, token_logps[i:j]) -> [j - i]`` the gradient of the final output with
    respect to each of them, then ``dz = g * (onehot - softmax) / T`` and the gradients of
    ``hidden``, ``weight``, ``bias`` (those ``needs`` asks for). Three matmuls per row where
    forward + recomputing backward take four. Returns
    ``(token_logps, grad_hidden, grad_weight_fp32, grad_bias_fp32)``; runs without autograd."""
    n = hidden.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token = torch.zeros(n, dtype=acc_dtype, device=hidden.device)
    grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, needs)
    rows = max((j - i for i, j in bounds), default=0)
    logits = _ChunkLogits(hidden, weight, bias, inv_temp, max(rows, 1)) if rows else None
    for k, (i, j) in enumerate(bounds):
        if j == i:
            row_grad(k, token[i:j])
            continue
        z = logits(i, j)
        label_logit = z.gather(1, labels[i:j, None]).squeeze(1)
        m = z.amax(1, keepdim=True)
        z.sub_(m).exp_()
        total = z.sum(1)
        token[i:j] = label_logit - m.squeeze(1) - total.log()
        g = row_grad(k, token[i:j]).to(acc_dtype) * inv_temp
        if not any(needs):
            continue
        z.mul_((g / total).neg_()[:, None])     # -g/T * p
        z.scatter_add_(1, labels[i:j, None], g[:, None])
        _accumulate_grads(z, i, j, hidden, weight, grad_h, grad_w, grad_b)
    return token, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------
# Triton backend
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logprob_fwd_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr,
        m_ptr, s_ptr, lab_ptr,
        N, V, H,
        stride_hn, stride_hh, stride_wv, stride_wh,
        tiles_per_split, inv_temp,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """One program: BLOCK_N rows x one split of the V range. Streams over the
        split's V tiles keeping a running max ``m`` and sum ``s`` of exp(z - m),
        and the label's logit; writes them to [splits, N] partial buffers. Row and
        column offsets are int64 (V x H passes 2**31 at H = 16384 and a 128k vocabulary)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)

        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        lab = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_mask = ks < H
                a = tl.load(
                    h_ptr + rows[:, None].to(tl.int64) * stride_hn + ks[None, :] * stride_hh,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                )
                b = tl.load(
                    w_ptr + cols[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wh,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0,
                )
                if IEEE:
                    z = tl.dot(a, b, z, input_precision="ieee")
                else:
                    z = tl.dot(a, b, z)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z = z * inv_temp
            z = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            lab += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_mask)
        tl.store(s_ptr + out, s, mask=row_mask)
        tl.store(lab_ptr + out, lab, mask=row_mask)

    @triton.jit
    def _logprob_dz_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr, dz_ptr,
        N, V, H,
        stride_hn, stride_hh, stride_wv, stride_wh, stride_dzn,
        inv_temp,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GROUP_N: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """One program: one (N tile, V tile) of a chunk of rows. Recomputes the logits tile
        and writes dz = g/T * (onehot(label) - softmax(z / T)) (the gradient of the rows'
        log-probs with respect to their logits) in the inputs' dtype; tiles whose rows all
        have a zero upstream gradient skip the matmul and write zeros."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_v = tl.cdiv(V, BLOCK_V)
        # Grouped order: GROUP_N row tiles sweep the V tiles together (W tiles reused from L2).
        per_group = GROUP_N * num_v
        group = pid // per_group
        first_n = group * GROUP_N
        group_size = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size

        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # upstream grad * inv_temp, fp32
        if tl.max(tl.abs(g), axis=0) > 0:
            labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_mask = ks < H
                a = tl.load(
                    h_ptr + rows[:, None].to(tl.int64) * stride_hn + ks[None, :] * stride_hh,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                )
                b = tl.load(
                    w_ptr + cols[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wh,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0,
                )
                if IEEE:
                    z = tl.dot(a, b, z, input_precision="ieee")
                else:
                    z = tl.dot(a, b, z)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            p = tl.exp(z * inv_temp - lse[:, None])
            is_label = cols[None, :] == labels[:, None]
            dz = (tl.where(is_label, 1.0, 0.0) - p) * g[:, None]
        else:
            dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        tl.store(
            dz_ptr + rows[:, None].to(tl.int64) * stride_dzn + cols[None, :],
            dz.to(dz_ptr.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )

else:  # pragma: no cover
    _logprob_fwd_kernel = _logprob_dz_kernel = None


def _triton_config(hidden: torch.Tensor) -> dict:
    """Tile sizes. Under the interpreter: the smallest tiles tl.dot accepts
    (fast to interpret). On GPUs: tiles that keep a [BLOCK_N, BLOCK_V] fp32
    accumulator in registers."""
    if _gpu_sms(hidden.device) is None:
        return dict(fwd=dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16), bwd=dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16),
                    fwd_launch={}, bwd_launch={})
    wide = hidden.dtype == torch.float32
    fwd = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32 if wide else 64)
    bwd = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32 if wide else 64)
    return dict(fwd=fwd, bwd=bwd, fwd_launch=dict(num_warps=8, num_stages=3), bwd_launch=dict(num_warps=8, num_stages=3))


def _gpu_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of the CUDA device the kernels run on; None when they are
    interpreted (CPU tensors). Tiles and split counts follow it (``tpo.kernels.compile_check``
    sets it to compile the GPU launches on a machine without one)."""
    if device.type != "cuda" or _interpreting():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _device_programs(hidden: torch.Tensor) -> int:
    sms = _gpu_sms(hidden.device)
    return 4 if sms is None else 2 * sms  # the interpreter: a few splits, so that the split-V merge is exercised


def _triton_forward(hidden, weight, bias, labels, inv_temp):
    n, h_size = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(hidden)
    bn, bv = cfg["fwd"]["BLOCK_N"], cfg["fwd"]["BLOCK_V"]
    n_tiles = triton.cdiv(n, bn)
    v_tiles = triton.cdiv(vocab, bv)
    splits = max(1, min(v_tiles, _device_programs(hidden) // n_tiles))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    m, s, lab = part[0], part[1], part[2]
    _logprob_fwd_kernel[(n_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, labels,
        m, s, lab,
        n, vocab, h_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        tiles_per_split, inv_temp,
        HAS_BIAS=bias is not None, IEEE=hidden.dtype == torch.float32,
        **cfg["fwd"], **cfg["fwd_launch"],
    )
    lse = torch.logsumexp(m + torch.log(s), dim=0) if splits > 1 else m[0] + torch.log(s[0])
    return lse, lab.sum(0)


def _triton_backward(hidden, weight, bias, labels, lse, gscaled, inv_temp, chunk, needs):
    """Chunks of rows: the Triton kernel recomputes the chunk's logits tile by tile and writes
    its dz ([chunk, V], the inputs' dtype); two GEMMs then give dz @ W (hidden's gradient,
    complete over the vocabulary) and add dz.T @ h into the fp32 weight gradient."""
    n, h_size = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(hidden)
    grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, needs)
    if not any(needs):
        return grad_h, grad_w, grad_b
    rows = min(chunk, n)
    dz_buf = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    bn, bv = cfg["bwd"]["BLOCK_N"], cfg["bwd"]["BLOCK_V"]
    for i in range(0, n, rows):
        j = min(i + rows, n)
        dz = dz_buf[: j - i]
        grid = (triton.cdiv(j - i, bn) * triton.cdiv(vocab, bv),)
        _logprob_dz_kernel[grid](
            hidden[i:j], weight, bias if bias is not None else hidden, labels[i:j], lse[i:j], gscaled[i:j], dz,
            j - i, vocab, h_size,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            inv_temp,
            HAS_BIAS=bias is not None, IEEE=hidden.dtype == torch.float32, GROUP_N=8,
            **cfg["bwd"], **cfg["bwd_launch"],
        )
        _accumulate_grads(dz, i, j, hidden, weight, grad_h, grad_w, grad_b)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------
# autograd.Function over the non-ignored rows
# --------------------------------------------------------------------------------------
class _FusedLinearLogProbFunction(torch.autograd.Function):
    """Per-token log-probs of rows whose labels are all valid (ignored rows are
    removed by the caller). Output fp32 (fp64 for fp64 inputs on torch)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temp, backend, chunk):
        ctx.inv_temp, ctx.backend, ctx.chunk = inv_temp, backend, chunk
        n = hidden.shape[0]
        if n == 0:  # the dtype of any other batch's log-probs
            lse = hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
            out = lse.clone()
        elif backend == "triton":
            with torch.cuda.device(hidden.device) if hidden.is_cuda else _nullcontext():
                lse, lab = _triton_forward(hidden, weight, bias, labels, inv_temp)
            out = lab - lse
        else:
            lse, lab = _torch_forward(hidden, weight, bias, labels, inv_temp, chunk)
            out = lab - lse
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.mark_non_differentiable(lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if hidden.shape[0] == 0 or not any(needs):
            grad_h = torch.zeros_like(hidden) if needs[0] else None
            grad_w = torch.zeros_like(weight) if needs[1] else None
            grad_b = torch.zeros_like(bias) if needs[2] else None
            return grad_h, grad_w, grad_b, None, None, None, None
        gscaled = (grad_out.to(lse.dtype) * ctx.inv_temp).contiguous()
        if ctx.backend == "triton":
            with torch.cuda.device(hidden.device) if hidden.is_cuda else _nullcontext():
                grad_h, grad_w, grad_b = _triton_backward(
                    hidden, weight, bias, labels, lse, gscaled, ctx.inv_temp, ctx.chunk, needs
                )
        else:
            grad_h, grad_w, grad_b = _torch_backward(hidden, weight, bias, labels, lse, gscaled, ctx.inv_temp, ctx.chunk, needs)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


class PrecomputedGradFunction(torch.autograd.Function):
    """Returns ``value``; its backward hands ``hidden``, ``weight``, ``bias`` the gradients
    computed together with it, times the upstream gradient (for forward passes that already
    know the gradient of their scalar output, as Liger's fused losses do)."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grad_h, grad_w, grad_b):
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is None:
                grads.append(None)
                continue
            scaled = grad if bool(grad_out == 1) else grad * grad_out.to(grad.dtype)
            grads.append(scaled.to(dtype))
        return (None, *grads, None, None, None)


def _torch_logprob_sum(hidden, weight, bias, labels, inv_temp, chunk):
    """Sum of the per-token log-probs, a scalar, with its gradients computed in the same pass."""
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled():
        needs = (False, False, False)
    n = hidden.shape[0]
    bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    with torch.no_grad():
        token, grad_h, grad_w, grad_b = torch_logprob_grad_pass(
            hidden, weight, bias, labels, inv_temp, bounds, lambda k, t: torch.ones_like(t), needs
        )
        value = token.sum()
    if not any(needs):
        return value
    return PrecomputedGradFunction.apply(value, hidden, weight, bias, grad_h, grad_w, grad_b)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "sum",
    backend: str = "auto",
    chunk_size: int | None = None,
) -> LogProbs:
    """Log-probabilities of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` hidden states (fp32, bf16, fp16; fp64 on the torch backend).
        weight: ``[V, H]`` LM head weight, same dtype as ``hidden``.
        labels: ``[N]`` or ``[B, T]`` token ids, aligned with ``hidden`` (the caller shifts:
            ``hidden[:, :-1]`` goes with ``labels[:, 1:]``); ``ignore_index`` marks positions to skip.
        bias: optional ``[V]`` LM head bias.
        temperature: logits are divided by it before the softmax (> 0).
        reduction: ``"none"`` per-token log-probs shaped like ``labels`` (0 where ignored);
            ``"sum"``/``"mean"`` over the tokens of each sequence: ``[B]`` for ``[B, T, H]``,
            a 0-dim scalar over all N tokens for ``[N, H]``. A mean over no tokens is 0.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        chunk_size: rows per chunk of the torch backend and of the Triton backward (default:
            a [chunk, V] buffer of 2^23 elements on CPU, 2^28 on GPU).

    Returns:
        :class:`LogProbs` ``(logps, counts)``: ``logps`` in fp32 (fp64 for fp64 inputs),
        ``counts`` (int64) the non-ignored tokens per sequence (``[B]``) or in total (0-dim).
        Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    _check_inputs(hidden, weight, labels, bias, ignore_index, temperature, reduction, backend, chunk_size)
    backend = _resolve_backend(backend, hidden)
    vocab, h_size = weight.shape
    flat_hidden = hidden.reshape(-1, h_size)
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    _check_label_range(labels.long(), valid.view(labels.shape), vocab, ignore_index)
    n = flat_labels.shape[0]
    chunk = int(chunk_size) if chunk_size is not None else _default_chunk_rows(n, vocab, hidden.device)
    inv_temp = 1.0 / float(temperature)

    all_valid = bool(valid.all())
    if all_valid:
        rows_hidden, rows_labels = flat_hidden, flat_labels
    else:
        index = valid.nonzero().squeeze(1)
        rows_hidden, rows_labels = flat_hidden.index_select(0, index), flat_labels.index_select(0, index)
    if backend == "triton" or rows_hidden.stride(-1) != 1:
        rows_hidden = rows_hidden.contiguous()
    if backend == "triton" and bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    if backend == "torch" and hidden.dim() == 2 and reduction != "none":
        # One scalar out: its upstream gradient is known up to a factor, so the gradients are
        # computed in the forward pass (3 matmuls instead of forward + recomputing backward's 4).
        total = _torch_logprob_sum(rows_hidden, weight, bias, rows_labels.contiguous(), inv_temp, chunk)
        counts = valid.sum()
        if reduction == "mean":
            total = total / counts.clamp(min=1).to(total.dtype)
        return LogProbs(total, counts)
    rows_logps = _FusedLinearLogProbFunction.apply(
        rows_hidden, weight, bias, rows_labels.contiguous(), inv_temp, backend, chunk
    )
    if all_valid:
        token_logps = rows_logps
    else:
        token_logps = rows_logps.new_zeros(n).index_copy(0, index, rows_logps)

    token_logps = token_logps.view(labels.shape)
    mask = valid.view(labels.shape)
    if hidden.dim() == 3:
        counts = mask.sum(1)
        sums = token_logps.sum(1) if reduction != "none" else None
    else:
        counts = mask.sum()
        sums = token_logps.sum() if reduction != "none" else None
    if reduction == "none":
        return LogProbs(token_logps, counts)
    if reduction == "sum":
        return LogProbs(sums, counts)
    return LogProbs(sums / counts.clamp(min=1).to(sums.dtype), counts)


def reference_linear_logprob(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, reduction="sum"):
    """The eager computation the fused op replaces (materialises the ``[N, V]`` logits,
    in the inputs' dtype, then an fp32 log-softmax, as TRL does). For tests and benchmarks."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    logp = (logits / temperature).log_softmax(-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    counts = mask.sum(-1)
    if reduction == "none":
        return LogProbs(token, counts)
    sums = token.sum(-1)
    if reduction == "sum":
        return LogProbs(sums, counts)
    return LogProbs(sums / counts.clamp(min=1).to(sums.dtype), counts)
