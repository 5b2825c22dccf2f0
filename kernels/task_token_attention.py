"""Task-token attention: a few task queries per sample attend to a shared context
and to themselves, never to one another.

``task_token_attention(q, k, v, k_self=None, v_self=None, kv_lengths=None, scale=None, backend="auto")``

* ``q``          ``[B, Hq, K, D]``  the K task queries of each sample,
* ``k``, ``v``   ``[B, Hkv, N, D]`` the shared context (grouped-query heads: ``Hq % Hkv == 0``,
  query head ``h`` reads key/value head ``h // (Hq // Hkv)``, as ``repeat_kv`` in transformers),
* ``k_self``, ``v_self`` ``[B, Hkv, K, D]`` (optional) each task query's own key and value,
* ``kv_lengths`` ``[B]`` (optional) how many leading context keys of each sample are valid
  (right padding); all ``N`` when omitted.

Query ``i`` of sample ``b`` attends to ``k[b, :, :kv_lengths[b]]`` and to ``k_self[b, :, i]``.
The output is ``[B, Hq, K, D]`` in the dtype of ``q``.

Layout of this file (one op per file, as Liger-Kernel):

* Triton kernels: a split-KV forward (``_fwd_split_kernel``: several programs per
  ``(sample, kv head, query block)``, each over one chunk of the context, writing a partial
  output and its log-sum-exp), a merge (``_fwd_merge_kernel``: log-sum-exp merge of the
  chunks and of the self key), a split-KV backward (``_bwd_split_kernel``: dk, dv of its
  chunk and a partial dq) and a finalize (``_bwd_finalize_kernel``: sum of the partial dq,
  gradients of the self key and value);
* ``TaskTokenAttentionFunction``: the ``torch.autograd.Function`` over those kernels;
* ``task_token_attention_torch``: the torch backend (CPU users, float64);
* ``task_token_attention_reference``: the plain formulation, PyTorch SDPA over the context
  and the self keys concatenated, with an explicit ``[B, 1, K, N + K]`` mask;
* ``task_token_attention``: the functional API with the ``backend=`` switch.

The query rows of the ``G = Hq // Hkv`` heads that share a key/value head are processed
together (``G * K`` rows per kv head) so that each key and value is read once per kv head.
Head dims that are not a power of two are padded to the next one inside the kernels with
masked loads and stores.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:  # Triton is optional on CPU-only installs; the torch backend then serves everything.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "TaskTokenAttentionFunction",
    "task_token_attention",
    "task_token_attention_reference",
    "task_token_attention_torch",
]

_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _fwd_split_kernel(
        Q, K, V, Lengths, PartO, PartLse,
        sqb, sqh, sqk, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        n_kv_heads, group, n_task, n_rows, n_ctx, chunk, n_splits,
        scale_log2,
        HAS_LENGTHS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One chunk of the context for one block of query rows of one (sample, kv head).

        Writes the chunk's normalised partial output ``PartO[bh, split, row, :]`` (fp32) and
        its base-2 log-sum-exp ``PartLse[bh, split, row]`` (``-inf`` for an empty chunk).
        """
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_m = tl.program_id(2)
        b = (pid_bh // n_kv_heads).to(tl.int64)  # int64 offsets: the context can exceed 2**31 elements
        j = pid_bh % n_kv_heads

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = j * group + rows // n_task
        tok = rows % n_task
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        q_ptrs = Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqk + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        if HAS_LENGTHS:
            length = tl.load(Lengths + b)
        else:
            length = n_ctx
        start = pid_s * chunk
        end = tl.minimum(start + chunk, length)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        k_base = K + b * skb + j * skh
        v_base = V + b * svb + j * svh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            kt = tl.load(
                k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        has_keys = l_i > 0.0
        safe_l = tl.where(has_keys, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(safe_l), float("-inf"))

        part = pid_bh * n_splits + pid_s
        tl.store(
            PartO + (part * n_rows + rows[:, None]) * BLOCK_D + offs_d[None, :],
            out,
            mask=row_ok[:, None],
        )
        tl.store(PartLse + part * n_rows + rows, lse, mask=row_ok)

    @triton.jit
    def _fwd_merge_kernel(
        Q, KS, VS, PartO, PartLse, Out, Lse,
        sqb, sqh, sqk, sqd,
        sksb, sksh, sksk, sksd,
        svsb, svsh, svsk, svsd,
        n_kv_heads, group, n_task, n_rows, n_splits,
        scale_log2,
        HAS_SELF: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Log-sum-exp merge of the chunks' partial outputs and of the self key/value.

        Writes ``Out`` (``[B, Hq, K, D]`` contiguous, dtype of q) and the base-2 log-sum-exp
        ``Lse`` (``[B, Hq, K]`` fp32) that the backward recomputes probabilities from.
        """
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // n_kv_heads).to(tl.int64)  # int64 offsets: the context can exceed 2**31 elements
        j = pid_bh % n_kv_heads

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = j * group + rows // n_task
        tok = rows % n_task
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        mask2 = row_ok[:, None] & d_ok[None, :]

        if HAS_SELF:
            q = tl.load(
                Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqk + offs_d[None, :] * sqd,
                mask=mask2,
                other=0.0,
            ).to(tl.float32)
            ks = tl.load(
                KS + b * sksb + j * sksh + tok[:, None] * sksk + offs_d[None, :] * sksd,
                mask=mask2,
                other=0.0,
            ).to(tl.float32)
            vs = tl.load(
                VS + b * svsb + j * svsh + tok[:, None] * svsk + offs_d[None, :] * svsd,
                mask=mask2,
                other=0.0,
            ).to(tl.float32)
            m_i = tl.sum(q * ks, 1) * scale_log2
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            acc = vs
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        for s_idx in range(n_splits):
            part = pid_bh * n_splits + s_idx
            lse_s = tl.load(PartLse + part * n_rows + rows, mask=row_ok, other=float("-inf"))
            o_s = tl.load(
                PartO + (part * n_rows + rows[:, None]) * BLOCK_D + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m_i, lse_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            w = tl.exp2(lse_s - m_safe)
            acc = acc * alpha[:, None] + w[:, None] * o_s
            l_i = l_i * alpha + w
            m_i = m_new

        safe_l = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / safe_l[:, None]
        lse = m_i + tl.log2(safe_l)
        out_rows = (b * n_kv_heads + j) * n_rows + rows  # [B, Hq, K] flattened == [B, Hkv, G*K]
        tl.store(Out + out_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask2)
        tl.store(Lse + out_rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_split_kernel(
        Q, K, V, Out, DOut, Lse, Lengths, DK, DV, DQPart,
        sqb, sqh, sqk, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        n_kv_heads, group, n_task, n_rows, n_ctx, chunk, n_splits,
        scale, scale_log2,
        HAS_LENGTHS: tl.constexpr,
        ATOMIC_KV: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Gradients through one chunk of the context for one block of query rows.

        ``DK``/``DV`` (``[B, Hkv, N, D]`` contiguous) receive the chunk's key/value gradients:
        stored directly when a single query block covers every row, accumulated with atomics
        (fp32 buffers) otherwise. ``DQPart[bh, split, row, :]`` (fp32) receives this chunk's
        share of dq, summed over the chunks by ``_bwd_finalize_kernel``.
        """
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_m = tl.program_id(2)
        b = (pid_bh // n_kv_heads).to(tl.int64)  # int64 offsets: the context can exceed 2**31 elements
        j = pid_bh % n_kv_heads

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = j * group + rows // n_task
        tok = rows % n_task
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        mask2 = row_ok[:, None] & d_ok[None, :]

        q = tl.load(
            Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqk + offs_d[None, :] * sqd, mask=mask2, other=0.0
        )
        out_rows = (b * n_kv_heads + j) * n_rows + rows
        o = tl.load(Out + out_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask2, other=0.0)
        do = tl.load(DOut + out_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask2, other=0.0)
        lse = tl.load(Lse + out_rows, mask=row_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)

        if HAS_LENGTHS:
            length = tl.load(Lengths + b)
        else:
            length = n_ctx
        start = pid_s * chunk
        end = tl.minimum(start + chunk, length)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = K + b * skb + j * skh
        v_base = V + b * svb + j * svh
        dkv_base = (b * n_kv_heads + j) * n_ctx
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            p = tl.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & n_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale
            dkv_ptrs = (dkv_base + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
            if ATOMIC_KV:
                tl.atomic_add(DK + dkv_ptrs, dk, mask=kv_mask)
                tl.atomic_add(DV + dkv_ptrs, dv, mask=kv_mask)
            else:
                tl.store(DK + dkv_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
                tl.store(DV + dkv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)

        part = pid_bh * n_splits + pid_s
        tl.store(
            DQPart + (part * n_rows + rows[:, None]) * BLOCK_D + offs_d[None, :],
            dq * scale,
            mask=row_ok[:, None],
        )

    @triton.jit
    def _bwd_finalize_kernel(
        Q, KS, VS, Out, DOut, Lse, DQPart, DQ, DKSRows, DVSRows,
        sqb, sqh, sqk, sqd,
        sksb, sksh, sksk, sksd,
        svsb, svsh, svsk, svsd,
        n_kv_heads, group, n_task, n_rows, n_splits,
        scale, scale_log2,
        HAS_SELF: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dq = sum of the chunks' partial dq + the self key's share; per-row gradients of the
        self key and value (``[B, Hq, K, D]`` fp32, summed over the query heads of a kv head
        by the caller)."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // n_kv_heads).to(tl.int64)  # int64 offsets: the context can exceed 2**31 elements
        j = pid_bh % n_kv_heads

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        tok = rows % n_task
        head = j * group + rows // n_task
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        mask2 = row_ok[:, None] & d_ok[None, :]
        out_rows = (b * n_kv_heads + j) * n_rows + rows
        out_ptrs = out_rows[:, None] * HEAD_DIM + offs_d[None, :]

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s_idx in range(n_splits):
            part = pid_bh * n_splits + s_idx
            dq += tl.load(
                DQPart + (part * n_rows + rows[:, None]) * BLOCK_D + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )

        if HAS_SELF:
            q = tl.load(
                Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqk + offs_d[None, :] * sqd, mask=mask2, other=0.0
            ).to(tl.float32)
            ks = tl.load(
                KS + b * sksb + j * sksh + tok[:, None] * sksk + offs_d[None, :] * sksd, mask=mask2, other=0.0
            ).to(tl.float32)
            vs = tl.load(
                VS + b * svsb + j * svsh + tok[:, None] * svsk + offs_d[None, :] * svsd, mask=mask2, other=0.0
            ).to(tl.float32)
            o = tl.load(Out + out_ptrs, mask=mask2, other=0.0).to(tl.float32)
            do = tl.load(DOut + out_ptrs, mask=mask2, other=0.0).to(tl.float32)
            lse = tl.load(Lse + out_rows, mask=row_ok, other=0.0)
            delta = tl.sum(o * do, 1)
            p_self = tl.exp2(tl.sum(q * ks, 1) * scale_log2 - lse)
            p_self = tl.where(row_ok, p_self, 0.0)
            ds_self = p_self * (tl.sum(do * vs, 1) - delta)
            dq += (scale * ds_self)[:, None] * ks
            tl.store(DKSRows + out_ptrs, (scale * ds_self)[:, None] * q, mask=mask2)
            tl.store(DVSRows + out_ptrs, p_self[:, None] * do, mask=mask2)

        tl.store(DQ + out_ptrs, dq.to(DQ.dtype.element_ty), mask=mask2)


# --------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


class _Config:
    """Tile sizes and launch settings of one split kernel (forward or backward)."""

    def __init__(self, block_m, block_n, block_d, num_warps, num_stages, merge_block_m):
        self.block_m, self.block_n, self.block_d = block_m, block_n, block_d
        self.num_warps, self.num_stages, self.merge_block_m = num_warps, num_stages, merge_block_m


def _config(kind: str, n_rows: int, head_dim: int, dtype: torch.dtype) -> _Config:
    """Tiles for ``kind`` (``"fwd"`` or ``"bwd"``) with ``n_rows = G * K`` query rows per kv head.

    Chosen from sm_90 compiles of the kernels (registers / spills / shared memory per
    setting, contiguous inputs); ``python -m tpo.kernels.compile_check`` compiles every
    launch for sm_80, sm_89 and sm_90 and fails on spills or shared memory over the limit."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreting():
        return _Config(16, 16, block_d, 4, 1, 32)  # merge tiles differ from split tiles on purpose
    rows = max(16, triton.next_power_of_2(n_rows))
    wide = block_d > 128
    if dtype == torch.float32:
        if kind == "fwd":
            return _Config(min(32, rows), 16 if wide else 32, block_d, 8, 2, 16)
        return _Config(min(32 if not wide else 16, rows), 16, block_d, 8, 2, 16)
    if kind == "fwd":
        return _Config(min(64, rows), 32 if wide else 64, block_d, 4, 3, 16)
    return _Config(min(64 if not wide else 32, rows), 32 if wide else 64, block_d, 8, 2, 16)


def _split_plan(n_ctx: int, block_n: int, programs_per_split: int, device, num_splits=None) -> tuple[int, int]:
    if num_splits is None:
        return _num_splits(n_ctx, block_n, programs_per_split, device)
    n_blocks = max(1, triton.cdiv(n_ctx, block_n))
    blocks_per_chunk = triton.cdiv(n_blocks, max(1, min(int(num_splits), n_blocks)))
    return triton.cdiv(n_blocks, blocks_per_chunk), blocks_per_chunk * block_n


def _gpu_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of the CUDA device the kernels run on; None when they are
    interpreted. Split counts follow it (``tpo.kernels.compile_check`` sets it to compile the
    GPU launches on a machine without one)."""
    if device.type != "cuda" or _interpreting():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(n_ctx: int, block_n: int, programs_per_split: int, device: torch.device) -> tuple[int, int]:
    """(number of chunks, keys per chunk): enough programs to fill the GPU about twice over."""
    n_blocks = max(1, triton.cdiv(n_ctx, block_n))
    sms = _gpu_sms(device)
    if sms is None:
        wanted = triton.cdiv(n_blocks, 2)  # two key blocks per chunk: exercises the merge on small shapes
    else:
        wanted = triton.cdiv(2 * sms, max(1, programs_per_split))
    wanted = max(1, min(wanted, n_blocks))
    blocks_per_chunk = triton.cdiv(n_blocks, wanted)
    chunk = blocks_per_chunk * block_n
    return triton.cdiv(n_blocks, blocks_per_chunk), chunk


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (not TF32) so fp32 results match eager fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _triton_forward(q, k, v, k_self, v_self, lengths, scale, num_splits=None):
    B, Hq, n_task, D = q.shape
    Hkv, n_ctx = k.shape[1], k.shape[2]
    group = Hq // Hkv
    n_rows = group * n_task
    cfg = _config("fwd", n_rows, D, q.dtype)
    block_m, block_n, block_d = cfg.block_m, cfg.block_n, cfg.block_d
    m_blocks = triton.cdiv(n_rows, block_m)
    n_splits, chunk = _split_plan(n_ctx, block_n, B * Hkv * m_blocks, q.device, num_splits)

    part_o = torch.empty((B * Hkv, n_splits, n_rows, block_d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B * Hkv, n_splits, n_rows), device=q.device, dtype=torch.float32)
    out = torch.empty((B, Hq, n_task, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, n_task), device=q.device, dtype=torch.float32)
    scale_log2 = scale * _LOG2E
    has_lengths = lengths is not None
    lengths_arg = lengths if has_lengths else part_lse  # unused pointer when HAS_LENGTHS is False

    _fwd_split_kernel[(n_splits, B * Hkv, m_blocks)](
        q, k, v, lengths_arg, part_o, part_lse,
        *_strides(q), *_strides(k), *_strides(v),
        Hkv, group, n_task, n_rows, n_ctx, chunk, n_splits,
        scale_log2,
        HAS_LENGTHS=has_lengths, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    has_self = k_self is not None
    ks = k_self if has_self else q
    vs = v_self if has_self else q
    _fwd_merge_kernel[(B * Hkv, triton.cdiv(n_rows, cfg.merge_block_m))](
        q, ks, vs, part_o, part_lse, out, lse,
        *_strides(q), *_strides(ks), *_strides(vs),
        Hkv, group, n_task, n_rows, n_splits,
        scale_log2,
        HAS_SELF=has_self, HEAD_DIM=D, BLOCK_M=cfg.merge_block_m, BLOCK_D=block_d,
        num_warps=4,
    )
    return out, lse


def _triton_backward(q, k, v, k_self, v_self, lengths, scale, out, lse, dout, num_splits=None):
    B, Hq, n_task, D = q.shape
    Hkv, n_ctx = k.shape[1], k.shape[2]
    group = Hq // Hkv
    n_rows = group * n_task
    cfg = _config("bwd", n_rows, D, q.dtype)
    block_m, block_n, block_d = cfg.block_m, cfg.block_n, cfg.block_d
    m_blocks = triton.cdiv(n_rows, block_m)
    n_splits, chunk = _split_plan(n_ctx, block_n, B * Hkv * m_blocks, q.device, num_splits)

    dout = dout.contiguous()
    atomic_kv = m_blocks > 1
    # Keys past a sample's length are never visited: their gradient is the zero the buffer starts with.
    kv_dtype = torch.float32 if atomic_kv else k.dtype
    need_zero = atomic_kv or lengths is not None
    alloc = torch.zeros if need_zero else torch.empty
    dk = alloc((B, Hkv, n_ctx, D), device=q.device, dtype=kv_dtype)
    dv = alloc((B, Hkv, n_ctx, D), device=q.device, dtype=kv_dtype)
    dq_part = torch.empty((B * Hkv, n_splits, n_rows, block_d), device=q.device, dtype=torch.float32)
    has_lengths = lengths is not None
    lengths_arg = lengths if has_lengths else lse
    scale_log2 = scale * _LOG2E

    _bwd_split_kernel[(n_splits, B * Hkv, m_blocks)](
        q, k, v, out, dout, lse, lengths_arg, dk, dv, dq_part,
        *_strides(q), *_strides(k), *_strides(v),
        Hkv, group, n_task, n_rows, n_ctx, chunk, n_splits,
        scale, scale_log2,
        HAS_LENGTHS=has_lengths, ATOMIC_KV=atomic_kv, HEAD_DIM=D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    has_self = k_self is not None
    ks = k_self if has_self else q
    vs = v_self if has_self else q
    dq = torch.empty((B, Hq, n_task, D), device=q.device, dtype=q.dtype)
    if has_self:
        dks_rows = torch.empty((B, Hq, n_task, D), device=q.device, dtype=torch.float32)
        dvs_rows = torch.empty((B, Hq, n_task, D), device=q.device, dtype=torch.float32)
    else:
        dks_rows = dvs_rows = dq_part  # unused pointers when HAS_SELF is False
    _bwd_finalize_kernel[(B * Hkv, triton.cdiv(n_rows, cfg.merge_block_m))](
        q, ks, vs, out, dout, lse, dq_part, dq, dks_rows, dvs_rows,
        *_strides(q), *_strides(ks), *_strides(vs),
        Hkv, group, n_task, n_rows, n_splits,
        scale, scale_log2,
        HAS_SELF=has_self, HEAD_DIM=D, BLOCK_M=cfg.merge_block_m, BLOCK_D=block_d,
        num_warps=4,
    )
    dk_self = dv_self = None
    if has_self:
        dk_self = dks_rows.view(B, Hkv, group, n_task, D).sum(2).to(k_self.dtype)
        dv_self = dvs_rows.view(B, Hkv, group, n_task, D).sum(2).to(v_self.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dk_self, dv_self


class TaskTokenAttentionFunction(torch.autograd.Function):
    """Autograd over the Triton kernels: ``apply(q, k, v, k_self, v_self, kv_lengths, scale)``.

    ``kv_lengths`` is ``None`` or an int32 ``[B]`` tensor on the device of ``q``; inputs are
    validated by :func:`task_token_attention`, which is the API to call."""

    @staticmethod
    def forward(ctx, q, k, v, k_self, v_self, kv_lengths, scale):
        out, lse = _triton_forward(q, k, v, k_self, v_self, kv_lengths, scale)
        ctx.save_for_backward(q, k, v, k_self, v_self, kv_lengths, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients have no graph: refuse create_graph
    def backward(ctx, dout):
        q, k, v, k_self, v_self, kv_lengths, out, lse = ctx.saved_tensors
        dq, dk, dv, dk_self, dv_self = _triton_backward(q, k, v, k_self, v_self, kv_lengths, ctx.scale, out, lse, dout)
        return dq, dk, dv, dk_self, dv_self, None, None


# --------------------------------------------------------------------------------------
# Torch backend and reference
# --------------------------------------------------------------------------------------
def task_token_attention_torch(q, k, v, k_self=None, v_self=None, kv_lengths=None, scale=None):
    """The torch backend: grouped matmuls over the context plus the self score, one softmax
    (fp32 for half inputs, as eager attention in transformers). Differentiable by autograd.
    Inputs are not validated here; call :func:`task_token_attention`."""
    B, Hq, n_task, D = q.shape
    Hkv, n_ctx = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    soft_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    qg = q.reshape(B, Hkv, group * n_task, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).to(soft_dtype) * scale  # [B, Hkv, G*K, N]
    if kv_lengths is not None:
        invalid = torch.arange(n_ctx, device=q.device)[None, :] >= kv_lengths.to(q.device)[:, None]  # [B, N]
        scores = scores.masked_fill(invalid[:, None, None, :], float("-inf"))
    if k_self is None:
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)
        return out.reshape(B, Hq, n_task, D).to(q.dtype)
    # Softmax over [context, self] without concatenating: one shared max and denominator.
    self_scores = (q.view(B, Hkv, group, n_task, D) * k_self[:, :, None]).sum(-1)
    self_scores = self_scores.reshape(B, Hkv, group * n_task, 1).to(soft_dtype) * scale
    # (an empty context, N == 0, leaves the self key alone: no max over zero keys)
    row_max = self_scores if n_ctx == 0 else torch.maximum(scores.amax(dim=-1, keepdim=True), self_scores)
    row_max = row_max.detach()
    weights = torch.exp(scores - row_max)
    self_weight = torch.exp(self_scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True) + self_weight
    out = torch.matmul((weights / denom).to(v.dtype), v)  # [B, Hkv, G*K, D]
    p_self = (self_weight / denom).to(v.dtype).view(B, Hkv, group, n_task, 1)
    out = out + (p_self * v_self[:, :, None]).reshape(B, Hkv, group * n_task, D)
    return out.reshape(B, Hq, n_task, D).to(q.dtype)


def task_token_mask(kv_lengths, n_ctx: int, n_task: int, batch: int, device, with_self: bool) -> torch.Tensor:
    """The boolean ``[B, 1, K, N (+ K)]`` mask of the plain formulation: context key ``n`` is
    visible to every task query of sample ``b`` when ``n < kv_lengths[b]``; self key ``j`` is
    visible to task query ``i`` only when ``i == j``."""
    ctx_ok = torch.ones(batch, n_ctx, dtype=torch.bool, device=device)
    if kv_lengths is not None:
        ctx_ok = torch.arange(n_ctx, device=device)[None, :] < torch.as_tensor(kv_lengths, device=device)[:, None]
    mask = ctx_ok[:, None, None, :].expand(batch, 1, n_task, n_ctx)
    if with_self:
        eye = torch.eye(n_task, dtype=torch.bool, device=device)[None, None].expand(batch, 1, n_task, n_task)
        mask = torch.cat([mask, eye], dim=-1)
    return mask


def task_token_attention_reference(q, k, v, k_self=None, v_self=None, kv_lengths=None, scale=None):
    """What one writes without this op: PyTorch SDPA over ``cat(context, self keys)`` with
    an explicit ``[B, 1, K, N + K]`` mask (GQA through ``enable_gqa``)."""
    B, Hq, n_task, _ = q.shape
    n_ctx = k.shape[2]
    with_self = k_self is not None
    keys = torch.cat([k, k_self], dim=2) if with_self else k
    values = torch.cat([v, v_self], dim=2) if with_self else v
    mask = task_token_mask(kv_lengths, n_ctx, n_task, B, q.device, with_self)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=Hq != k.shape[1])


# --------------------------------------------------------------------------------------
# Validation and the functional API
# --------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _validate(q, k, v, k_self, v_self, kv_lengths, scale, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"task_token_attention: backend={backend!r} is not one of {_BACKENDS}.")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_self", k_self), ("v_self", v_self)):
        if t is None and name in ("k_self", "v_self"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"task_token_attention: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"task_token_attention: {name} must be 4-D "
                f"({'[B, Hq, K, D]' if name == 'q' else '[B, Hkv, N, D]' if name in ('k', 'v') else '[B, Hkv, K, D]'}),"
                f" got shape {_shape(t)}. Heads go before the sequence axis: transpose [B, L, H, D] with .transpose(1, 2)."
            )
        if not t.is_floating_point():
            raise TypeError(f"task_token_attention: {name} must be a floating-point tensor, got {t.dtype}.")
        if t.dtype != q.dtype:
            raise TypeError(
                f"task_token_attention: {name} has dtype {t.dtype} but q has {q.dtype}; cast all of q, k, v"
                " (and k_self, v_self) to one dtype."
            )
        if t.device != q.device:
            raise ValueError(
                f"task_token_attention: {name} is on {t.device} but q is on {q.device}; move all inputs to one device."
            )
    if (k_self is None) != (v_self is None):
        raise ValueError("task_token_attention: pass both k_self and v_self, or neither.")

    B, Hq, n_task, D = q.shape
    if n_task < 1 or D < 1:
        raise ValueError(f"task_token_attention: q {_shape(q)} needs at least one task query and a head dim >= 1.")
    if k.shape != v.shape:
        raise ValueError(f"task_token_attention: k {_shape(k)} and v {_shape(v)} must have the same shape [B, Hkv, N, D].")
    if k.shape[0] != B:
        raise ValueError(f"task_token_attention: q has batch {B} but k has batch {k.shape[0]}.")
    if k.shape[3] != D:
        raise ValueError(f"task_token_attention: q has head dim {D} but k has head dim {k.shape[3]}.")
    Hkv, n_ctx = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"task_token_attention: the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads ({Hkv}) (grouped-query attention); check the head axes (dim 1) of q and k."
        )
    if k_self is not None:
        expected = (B, Hkv, n_task, D)
        for name, t in (("k_self", k_self), ("v_self", v_self)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"task_token_attention: {name} must have shape [B, Hkv, K, D] = {list(expected)} "
                    f"(one key/value per task query, on the key/value heads), got {_shape(t)}."
                )
    if n_ctx == 0 and k_self is None:
        raise ValueError("task_token_attention: the context k is empty (N == 0) and there is no k_self: nothing to attend to.")

    lengths = None
    if kv_lengths is not None:
        if isinstance(kv_lengths, torch.Tensor):
            lengths = kv_lengths
        elif isinstance(kv_lengths, Sequence):
            lengths = torch.tensor(list(kv_lengths))
        else:
            raise TypeError(
                f"task_token_attention: kv_lengths must be a [B] integer tensor or a list of ints, "
                f"got {type(kv_lengths).__name__}."
            )
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"task_token_attention: kv_lengths must hold integers, got dtype {lengths.dtype}.")
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"task_token_attention: kv_lengths must have shape [B] = [{B}], got {_shape(lengths)}.")
        low = 0 if k_self is not None else 1
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < low or hi > n_ctx:
            raise ValueError(
                f"task_token_attention: kv_lengths must lie in [{low}, N={n_ctx}] "
                f"({'0 is allowed because each query attends to its own k_self' if k_self is not None else 'at least 1: without k_self a query needs one context key'}),"
                f" got values in [{lo}, {hi}]."
            )
        lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()

    if scale is None:
        scale = D**-0.5
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"task_token_attention: scale must be a finite number or None (1/sqrt(D)), got {scale!r}.")
    return lengths, float(scale)


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    runnable = _HAS_TRITON and (q.is_cuda or (_interpreting() and q.device.type == "cpu"))
    if backend == "auto":
        return _HAS_TRITON and q.is_cuda and q.dtype in _TRITON_DTYPES
    if not _HAS_TRITON:
        raise RuntimeError("task_token_attention: backend='triton' needs the triton package; install it or use backend='torch'.")
    if not runnable:
        raise ValueError(
            f"task_token_attention: backend='triton' needs CUDA tensors (got {q.device}); move the inputs to a GPU, "
            "set TRITON_INTERPRET=1 to run the kernels on CPU for debugging, or use backend='torch'."
        )
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"task_token_attention: backend='triton' supports float16, bfloat16 and float32, got {q.dtype}; "
            "use backend='torch' for other dtypes."
        )
    if _interpreting() and q.dtype != torch.float32:
        raise TypeError(
            f"task_token_attention: the Triton interpreter (TRITON_INTERPRET=1) runs float32 only, got {q.dtype}."
        )
    return True


def _prepare(t: torch.Tensor | None) -> torch.Tensor | None:
    # The kernels take any strides but need unit stride on the head dim for coalesced loads.
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def task_token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_self: torch.Tensor | None = None,
    v_self: torch.Tensor | None = None,
    kv_lengths: torch.Tensor | Sequence[int] | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``K`` task queries over a shared context and themselves.

    Args:
        q: ``[B, Hq, K, D]`` task queries.
        k, v: ``[B, Hkv, N, D]`` the context's keys and values (``Hq % Hkv == 0``).
        k_self, v_self: ``[B, Hkv, K, D]`` each task query's own key and value, or ``None``.
        kv_lengths: ``[B]`` valid context length of each sample (right padding), or ``None`` for all ``N``.
        scale: the softmax scale, ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, Hq, K, D]`` in the dtype of ``q``; differentiable in q, k, v, k_self and v_self.
    """
    lengths, scale = _validate(q, k, v, k_self, v_self, kv_lengths, scale, backend)
    if _use_triton(q, backend):
        q, k, v, k_self, v_self = (_prepare(t) for t in (q, k, v, k_self, v_self))
        return TaskTokenAttentionFunction.apply(q, k, v, k_self, v_self, lengths, scale)
    return task_token_attention_torch(q, k, v, k_self, v_self, lengths, scale)

