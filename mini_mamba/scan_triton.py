"""The selective scan as a compact Triton GPU kernel, forward and backward.

Computes exactly scan_ref.py (Gu & Dao 2023, Algorithm 2) the way section 3.3.2 describes the hardware-aware scan:
the state h never leaves the chip. Hold it against scan_ref.py line by line:

    scan_ref.py                                   here (one program = BLOCK_C channels of one sequence)
    delta = softplus(delta + delta_bias)          _load_delta(): once per (channel, step), not once per state
    A_bar = exp(delta * A)                        exp2(delta * A·log2(e))  (the exp unit computes 2^x)
    h = A_bar * h + delta * B * u                 tl.associative_scan over a chunk of BLOCK_T steps, one state n at a time
    y = (h * C).sum(-1)                           y += h * C_n, accumulated over the states in registers
    finish(): y + D*u, y * silu(z)                fused at the end of each chunk

Layout. A program owns a tile of BLOCK_C channels × BLOCK_T time steps, loaded coalesced (time is contiguous). For
each state n it forms the pairs (Ā_t, B̄_t u_t) of the tile and scans them along time with the operator
(a₁, b₁)∘(a₂, b₂) = (a₁a₂, a₂b₁ + b₂) (why that works: scan_parallel.py). The state reached at the end of the chunk
seeds the first step of the next chunk: chunks go one after another, states stay in registers ([BLOCK_C, d_state]).
Row n+1 of B and C is fetched while state n is scanned: without that, every state waits for a memory round trip. The
forward unrolls its loop over the states 4 times, so that the scans of four states (independent of each other) overlap.

Memory. Nothing of size (batch, d_inner, seqlen, d_state) is ever written. For the backward, the forward saves the state
at the start of every chunk, (batch, d_inner, n_chunks, d_state) in fp32 — d_state/BLOCK_T floats per input element.

Backward. Chunks in reverse. Inside a chunk, for each state n: recompute h_t from the saved chunk-start state (the same
scan as the forward), then scan backwards for g_t = dL/dh_t:

    g_t = dy_t C_t + Ā_{t+1} g_{t+1}           (pairs (Ā_{t+1}, dy_t C_t), tl.associative_scan(reverse=True))

where dy = dout · silu(z). Then, with b_t = Δ_t B_t u_t and g_t (h_t − b_t) = g_t Ā_t h_{t−1}:

    du_t = g_t B_t Δ_t + D dy_t                dΔ_t = g_t B_t u_t + g_t Ā_t h_{t−1} A   (× sigmoid, for the softplus)
    dB_t = Σ_channels g_t Δ_t u_t              dC_t = Σ_channels dy_t h_t
    dA   = Σ_t g_t Ā_t h_{t−1} Δ_t            dD = Σ_t dy_t u_t          dh_{−1} = Ā_0 g_0  (-> the previous chunk)

dB and dC of per-step B/C sum over every channel: each program adds its channels' sum with relaxed fp32 atomics (the
order of those additions, and so the last bits of dB and dC, can vary from run to run). Everything else is reduced
deterministically: per program in registers, then over programs with torch.sum.

Parallelism along the sequence. A program walks its channels' whole sequence, so batch · d_inner / BLOCK_C programs
is all the parallelism there is — too little to fill a GPU at batch 1. Then the sequence is cut into segments, each run
by its own program. A first, cheaper pass (_segment_kernel) summarises each segment in closed form: the decay across it,
exp(A ΣΔ), and the state it produces from a zero start, Σ_t exp(A Σ_{s>t} Δ_s) Δ_t B_t u_t — a sum, so all states of
a channel reduce at once. The main pass then starts segment k from the combination of the summaries of segments
0..k−1 (a few [BLOCK_C, d_state] FMAs). The backward does the same in reverse for dL/dh, with
Σ_t exp(A Σ_{s≤t} Δ_s) dy_t C_t.

Tiles (tile_config) were chosen by timing on an H200; the README has the table against the official CUDA kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SHORT_TILE = 256          # channels × steps of a program's tile when the sequence is shorter than 128 (tile_config)


# ----------------------------------------------------------------------------------------------------------------------
# Small pieces shared by the kernels


@triton.jit
def _combine(a_first, b_first, a_then, b_then):
    """Compose two steps h -> a h + b: first (a_first, b_first), then (a_then, b_then)."""
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _softplus(x):
    # log(1 + e^x) through the exp2/log2 units; for large x it is x itself
    return tl.where(x > 20.0, x, tl.log2(1.0 + tl.exp2(x * 1.4426950408889634)) * 0.6931471805599453)


@triton.jit
def _load_delta(delta_ptr, offs, mask, delta_bias, SOFTPLUS: tl.constexpr):
    """Δ for a [BLOCK_C, BLOCK_T] tile: (raw Δ + bias, Δ used by the scan). Steps past the end get Δ = 0: Ā = 1, B̄u = 0,
    an identity step, so the state passes through untouched."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + delta_bias[:, None]
    delta = raw
    if SOFTPLUS:
        delta = _softplus(raw)
    return raw, tl.where(mask, delta, 0.0)


@triton.jit
def _load_state_matrix(ptr, b, n, c, t, L, D_INNER, stride_b, stride_n, D_STATE: tl.constexpr, PER_STEP: tl.constexpr):
    """Row n of B or C, broadcastable against a [BLOCK_C, BLOCK_T] tile: per step (batch, d_state, seqlen), time
    contiguous, gives [1, BLOCK_T], time-invariant (d_inner, d_state) gives [BLOCK_C, 1]."""
    if PER_STEP:
        row = b.to(tl.int64) * stride_b + n * stride_n
        M_n = tl.load(ptr + row + t, mask=t < L, other=0.0).to(tl.float32)[None, :]
    else:
        M_n = tl.load(ptr + c * D_STATE + n, mask=c < D_INNER, other=0.0).to(tl.float32)[:, None]
    return M_n


@triton.jit
def _state_rows(B_ptr, C_ptr, b, n, c, t, L, D_INNER, stride_b, stride_n, D_STATE: tl.constexpr,
                B_PER_STEP: tl.constexpr, C_PER_STEP: tl.constexpr):
    """Row n of B and of C (see _load_state_matrix); per-step B and C share their strides."""
    return (_load_state_matrix(B_ptr, b, n, c, t, L, D_INNER, stride_b, stride_n, D_STATE, B_PER_STEP),
            _load_state_matrix(C_ptr, b, n, c, t, L, D_INNER, stride_b, stride_n, D_STATE, C_PER_STEP))


@triton.jit
def _column(tile, cols, i):
    """Column i of a 2-D tile, as a vector over its rows (cols: the column indices, shaped [1, width])."""
    return tl.sum(tl.where(cols == i, tile, 0.0), axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# Sequence parallelism: closed-form summaries of segments


@triton.jit
def _segment_kernel(w_ptr, delta_ptr, A_ptr, M_ptr, z_ptr, bias_ptr, state_ptr, decay_ptr,
                    d_inner, L, segment_len, first_segment, stride_b, stride_c, m_stride_b, m_stride_n,
                    D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                    PER_STEP: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BACKWARD: tl.constexpr):
    """Per (segment, batch, channel, state): the decay exp(A ΣΔ) across the segment, and
         forward  (BACKWARD=False, w = u, M = B):    Σ_t exp(A Σ_{s>t} Δ_s) Δ_t B_t u_t   = h at the segment's end from 0
         backward (BACKWARD=True, w = dout, M = C):  Σ_t exp(A Σ_{s<=t} Δ_s) dy_t C_t      = dL/dh just before it
       (dy = dout · silu(z)). Written to (n_segments, batch, d_inner, d_state) fp32. One program per BLOCK_C channels,
       with every state at once in a [BLOCK_C, d_state, BLOCK_T] tile: a sum, not a scan, so one reduction along time
       per tile; a row of per-step B or C is loaded once for the program's channels."""
    pid_c, b, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2) + first_segment
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)                                  # (C,)
    n = tl.arange(0, BLOCK_N)[None, :]                                           # (1, N)
    cn_mask = (c[:, None] < d_inner) & (n < D_STATE)
    A2 = tl.load(A_ptr + c[:, None] * D_STATE + n, mask=cn_mask, other=0.0) * 1.4426950408889634   # (C, N) A·log2(e)
    bias = tl.load(bias_ptr + c, mask=c < d_inner, other=0.0)                    # (C,) the channels' Δ bias
    row = b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c                  # (C,)
    summary = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)                          # ΣΔ over the steps so far
    segment_end = tl.minimum((seg + 1) * segment_len, L)
    for start in range(seg * segment_len, segment_end, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)                                        # (T,)
        mask = (c[:, None] < d_inner) & (t[None, :] < segment_end)               # (C, T)
        offs = row[:, None] + t[None, :]
        _, delta = _load_delta(delta_ptr, offs, mask, bias, SOFTPLUS)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            if HAS_Z:
                z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                w = w * z * tl.sigmoid(z)                                        # dy = dout · silu(z)
            span = delta_sum[:, None] + tl.cumsum(delta, axis=1)                 # Σ_{s<=t} Δ_s from the segment start
        else:
            w = w * delta                                                        # Δ u
            span = tl.cumsum(delta, axis=1, reverse=True) - delta               # Σ_{s>t} Δ_s within this tile
        if PER_STEP:
            M = tl.load(M_ptr + b.to(tl.int64) * m_stride_b + n[:, :, None] * m_stride_n + t[None, None, :],
                        mask=(n[:, :, None] < D_STATE) & (t[None, None, :] < segment_end), other=0.0)   # (1, N, T)
        else:
            M = tl.load(M_ptr + c[:, None] * D_STATE + n, mask=cn_mask, other=0.0)[:, :, None]       # (C, N, 1)
        local = tl.sum(tl.exp2(A2[:, :, None] * span[:, None, :]) * w[:, None, :] * M.to(tl.float32), axis=2)  # (C, N)
        tile_sum = tl.sum(delta, axis=1)                                         # (C,)
        if BACKWARD:
            summary += local
        else:
            summary = tl.exp2(A2 * tile_sum[:, None]) * summary + local         # later tiles decay earlier ones
        delta_sum += tile_sum
    out = ((seg * tl.num_programs(1) + b) * d_inner + c[:, None]) * D_STATE + n  # (C, N) in (seg, batch, d, n)
    tl.store(state_ptr + out, summary, mask=cn_mask)
    tl.store(decay_ptr + out, tl.exp2(A2 * delta_sum[:, None]), mask=cn_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                    seg_state_ptr, seg_decay_ptr, out_ptr, chunk_states_ptr, last_state_ptr,
                    d_inner, L, chunks_per_segment, stride_b, stride_c, bc_stride_b, bc_stride_n,
                    D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                    B_PER_STEP: tl.constexpr, C_PER_STEP: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                    SAVE_STATES: tl.constexpr):
    pid_c, b, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)                                  # (C,) this program's channels
    n = tl.arange(0, BLOCK_N)[None, :]                                           # (1, N) state index
    t_in_chunk = tl.arange(0, BLOCK_T)[None, :]                                  # (1, T)
    cn_mask = (c[:, None] < d_inner) & (n < D_STATE)
    cn = (b * d_inner + c[:, None]) * D_STATE + n                                # (C, N) into (batch, d_inner, d_state)
    A2 = tl.load(A_ptr + c[:, None] * D_STATE + n, mask=cn_mask, other=0.0) * 1.4426950408889634   # A·log2(e)
    bias = tl.load(bias_ptr + c, mask=c < d_inner, other=0.0)
    D = tl.load(D_ptr + c, mask=c < d_inner, other=0.0)
    row = b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c                  # (C,) start of each channel's sequence

    h = tl.load(h0_ptr + cn, mask=cn_mask, other=0.0)                            # (C, N) fp32 state
    for k in range(seg):                                                         # the state at this segment's start
        seg_cn = k * tl.num_programs(1) * d_inner * D_STATE + cn
        h = tl.load(seg_decay_ptr + seg_cn, mask=cn_mask) * h + tl.load(seg_state_ptr + seg_cn, mask=cn_mask)

    n_chunks = tl.cdiv(L, BLOCK_T)
    for chunk in range(seg * chunks_per_segment, tl.minimum((seg + 1) * chunks_per_segment, n_chunks)):
        t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)                              # (T,)
        mask = (c[:, None] < d_inner) & (t[None, :] < L)
        offs = row[:, None] + t[None, :]                                         # (C, T)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, delta = _load_delta(delta_ptr, offs, mask, bias, SOFTPLUS)
        delta_u = delta * u
        if SAVE_STATES:                                                          # the backward restarts from these
            tl.store(chunk_states_ptr + ((b * d_inner + c[:, None]) * n_chunks + chunk) * D_STATE + n, h,
                     mask=cn_mask)
        y = D[:, None] * u                                                       # (C, T) the skip term D u
        B_i, C_i = _state_rows(B_ptr, C_ptr, b, 0, c, t, L, d_inner, bc_stride_b, bc_stride_n, D_STATE, B_PER_STEP,
                               C_PER_STEP)
        for i in tl.range(D_STATE, loop_unroll_factor=4):    # 4 states' scans in flight at once (see tile_config)
            # fetch the next state's rows of B and C now, so that their latency hides behind this state's scan
            B_next, C_next = _state_rows(B_ptr, C_ptr, b, (i + 1) % D_STATE, c, t, L, d_inner, bc_stride_b,
                                         bc_stride_n, D_STATE, B_PER_STEP, C_PER_STEP)
            A2_i = _column(A2, n, i)                                             # (C,)
            A_bar = tl.exp2(delta * A2_i[:, None])                               # (C, T) Ā_t = exp(Δ_t A)
            Bu = delta_u * B_i                                                   # (C, T) B̄_t u_t = Δ_t B_t u_t
            Bu = tl.where(t_in_chunk == 0, Bu + A_bar * _column(h, n, i)[:, None], Bu)   # seed: the carried state
            _, h_i = tl.associative_scan((A_bar, Bu), 1, _combine)              # (C, T) h_t for state i
            y += h_i * C_i
            h = tl.where(n == i, _column(h_i, t_in_chunk, BLOCK_T - 1)[:, None], h)    # carry to the next chunk
            B_i, C_i = B_next, C_next
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)                                               # gate: y · silu(z)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if seg == tl.num_programs(2) - 1:
        tl.store(last_state_ptr + cn, h, mask=cn_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, chunk_states_ptr,
                     dlast_ptr, seg_grad_ptr, seg_decay_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
                     d_inner, L, chunks_per_segment, stride_b, stride_c, bc_stride_b, bc_stride_n,
                     D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                     B_PER_STEP: tl.constexpr, C_PER_STEP: tl.constexpr, HAS_Z: tl.constexpr,
                     SOFTPLUS: tl.constexpr):
    pid_c, b, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_batch, n_segments = tl.num_programs(1), tl.num_programs(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)                                  # (C,)
    n = tl.arange(0, BLOCK_N)[None, :]                                           # (1, N)
    t_in_chunk = tl.arange(0, BLOCK_T)[None, :]                                  # (1, T)
    cn_mask = (c[:, None] < d_inner) & (n < D_STATE)
    cn = (b * d_inner + c[:, None]) * D_STATE + n                                # (C, N)
    A = tl.load(A_ptr + c[:, None] * D_STATE + n, mask=cn_mask, other=0.0)      # (C, N)
    bias = tl.load(bias_ptr + c, mask=c < d_inner, other=0.0)
    D = tl.load(D_ptr + c, mask=c < d_inner, other=0.0)
    row = b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c

    dh = tl.load(dlast_ptr + cn, mask=cn_mask, other=0.0)                        # (C, N) dL/dh at the segment's end
    for j in range(n_segments - 1 - seg):                                        # ... from the segments after it
        seg_cn = (n_segments - 1 - j) * n_batch * d_inner * D_STATE + cn
        dh = tl.load(seg_decay_ptr + seg_cn, mask=cn_mask) * dh + tl.load(seg_grad_ptr + seg_cn, mask=cn_mask)
    dA = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)                         # per-program partial sums
    dB = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)                         # (time-invariant B, C only)
    dC = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)

    n_chunks = tl.cdiv(L, BLOCK_T)
    first_chunk = seg * chunks_per_segment
    for back in range(tl.minimum((seg + 1) * chunks_per_segment, n_chunks) - first_chunk):
        chunk = tl.minimum((seg + 1) * chunks_per_segment, n_chunks) - 1 - back     # chunks in reverse
        t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (c[:, None] < d_inner) & (t[None, :] < L)
        offs = row[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, delta = _load_delta(delta_ptr, offs, mask, bias, SOFTPLUS)
        next_mask = (c[:, None] < d_inner) & (t[None, :] + 1 < L)
        _, delta_next = _load_delta(delta_ptr, offs + 1, next_mask, bias, SOFTPLUS)     # Δ_{t+1}
        delta_u = delta * u
        dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy *= z * tl.sigmoid(z)                                              # gradient reaching y before the gate
        dD += tl.sum(dy * u, axis=1)
        h_start = tl.load(chunk_states_ptr + ((b * d_inner + c[:, None]) * n_chunks + chunk) * D_STATE + n,
                          mask=cn_mask, other=0.0)                               # (C, N) saved by the forward
        y = D[:, None] * u                                                       # recomputed, for dz
        gB = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)                      # Σ_n g B_n
        g_decay_A = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)              # Σ_n g_n Ā_n h_{n,t-1} A_n
        B_i, C_i = _state_rows(B_ptr, C_ptr, b, 0, c, t, L, d_inner, bc_stride_b, bc_stride_n, D_STATE, B_PER_STEP,
                               C_PER_STEP)
        for i in range(D_STATE):
            B_next, C_next = _state_rows(B_ptr, C_ptr, b, (i + 1) % D_STATE, c, t, L, d_inner, bc_stride_b,
                                         bc_stride_n, D_STATE, B_PER_STEP, C_PER_STEP)   # prefetch, as forward
            A_i = _column(A, n, i)                                               # (C,)
            # forward again: h_t from the chunk's start state
            A_bar = tl.exp2(delta * (A_i * 1.4426950408889634)[:, None])
            Bu = delta_u * B_i
            seeded = tl.where(t_in_chunk == 0, Bu + A_bar * _column(h_start, n, i)[:, None], Bu)
            _, h_i = tl.associative_scan((A_bar, seeded), 1, _combine)
            y += h_i * C_i
            # backward: g_t = dy_t C_t + Ā_{t+1} g_{t+1}, seeded at the chunk's end with dL/dh from later chunks
            A_bar_next = tl.exp2(delta_next * (A_i * 1.4426950408889634)[:, None])
            dyC = dy * C_i
            dyC = tl.where(t_in_chunk == BLOCK_T - 1, dyC + _column(dh, n, i)[:, None], dyC)
            _, g = tl.associative_scan((A_bar_next, dyC), 1, _combine, reverse=True)
            g_decay = g * (h_i - Bu)                                             # g_t Ā_t h_{t-1}
            gB += g * B_i
            g_decay_A += g_decay * A_i[:, None]
            dA = tl.where(n == i, dA + tl.sum(g_decay * delta, axis=1)[:, None], dA)
            if B_PER_STEP:
                tl.atomic_add(dB_ptr + (b * D_STATE + i).to(tl.int64) * L + t, tl.sum(g * delta_u, axis=0),
                              mask=t < L, sem="relaxed")                 # a sum, no ordering needed
            else:
                dB = tl.where(n == i, dB + tl.sum(g * delta_u, axis=1)[:, None], dB)
            if C_PER_STEP:
                tl.atomic_add(dC_ptr + (b * D_STATE + i).to(tl.int64) * L + t, tl.sum(dy * h_i, axis=0),
                              mask=t < L, sem="relaxed")
            else:
                dC = tl.where(n == i, dC + tl.sum(dy * h_i, axis=1)[:, None], dC)
            dh = tl.where(n == i, _column(g * A_bar, t_in_chunk, 0)[:, None], dh)   # dL/dh_{-1} = Ā_0 g_0
            B_i, C_i = B_next, C_next
        # du = D dy + Δ Σ g B,   dΔ = u Σ g B + Σ g Ā h_{t-1} A   (then through the softplus)
        tl.store(du_ptr + offs, (D[:, None] * dy + delta * gB).to(du_ptr.dtype.element_ty), mask=mask)
        delta_raw, _ = _load_delta(delta_ptr, offs, mask, bias, SOFTPLUS)
        ddelta = gB * u + g_decay_A
        if SOFTPLUS:
            ddelta *= tl.sigmoid(delta_raw)                                      # d softplus(x)/dx
        ddelta = tl.where(mask, ddelta, 0.0)
        dbias += tl.sum(ddelta, axis=1)
        tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:                                                                # dz = dout · y · silu'(z)
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z_sigmoid = tl.sigmoid(z)
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = dout * y * z_sigmoid * (1.0 + z * (1.0 - z_sigmoid))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)

    part = (seg * n_batch + b) * d_inner + c                                     # (C,) into (segments, batch, d_inner)
    tl.store(dA_ptr + part[:, None] * D_STATE + n, dA, mask=cn_mask)
    if not B_PER_STEP:
        tl.store(dB_ptr + part[:, None] * D_STATE + n, dB, mask=cn_mask)
    if not C_PER_STEP:
        tl.store(dC_ptr + part[:, None] * D_STATE + n, dC, mask=cn_mask)
    tl.store(dD_ptr + part, dD, mask=c < d_inner)
    tl.store(dbias_ptr + part, dbias, mask=c < d_inner)
    if seg == 0:
        tl.store(dh0_ptr + cn, dh, mask=cn_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launching


def tile_config(batch: int, d_inner: int, seqlen: int, device: torch.device) -> dict:
    """Tile shapes for a problem size. Measured on an H200 at 8·1536·2048 (bf16, d_state 16): one warp on 4 channels ×
    128 steps was the fastest forward (0.49 ms; 8 warps on 8 × 256: 0.78 ms) and backward; the backward may use its own
    channel count and warps, but the time chunk is shared (it restarts from the forward's chunk states). Segments
    along the sequence when there are fewer programs than ~24 per multiprocessor (1·1536·128K: 8 segments, forward
    13.5 -> 5.4 ms); the segment summaries use [summary_block_c, d_state, time] tiles of summary_elements (4 channels
    share each load of B or C: 1.74 -> 1.57 ms at 1·128K).
    The forward's loop over the states is unrolled 4 times (forward 5.4 -> 4.6 ms at 1·128K, 3.7 -> 2.9 ms at 8·16K;
    2 times: 5.2 and 3.5; fully: 5.3 and 3.7). Unrolling the backward's loop made it slower (fully: 2.5× the time;
    2 times: +5%): its loop body holds more live tiles, and unrolled they no longer fit one warp's registers.
    A sequence shorter than 128 steps gets one chunk of the next power of two (at least 16) and SHORT_TILE // block_t
    channels (at least 4, at most d_inner's next power of two). At MambaVision-small's scans (batch 256, bf16,
    d_state 8), kernel time forward + backward:
    128 channels × 49 steps 112 + 290 -> 57 + 159 us (64 steps × 4 channels; 8 or 16 channels: backward 175 and 302 us);
    256 channels × 16 steps 64 + 456 -> 12 + 73 us (16 steps × 16 channels; 4 channels: 20 + 85, 32: 11 + 72)."""
    config = dict(block_t=128, block_c=4, num_warps=1, bwd_block_c=4, bwd_num_warps=1, n_segments=1,
                  summary_block_c=4, summary_elements=8192, summary_num_warps=4)
    if seqlen < config["block_t"]:                   # a short sequence: one chunk just long enough, more channels
        config["block_t"] = max(16, triton.next_power_of_2(seqlen))
        channels = min(SHORT_TILE // config["block_t"], triton.next_power_of_2(d_inner))
        config["block_c"] = config["bwd_block_c"] = max(4, channels)
    programs = batch * triton.cdiv(d_inner, config["block_c"])
    if device.type == "cuda":
        target = 24 * torch.cuda.get_device_properties(device).multi_processor_count
        n_chunks = triton.cdiv(seqlen, config["block_t"])
        config["n_segments"] = max(1, min(n_chunks // 8, target // programs))
    return config


def _launch_shape(batch: int, d_inner: int, seqlen: int, config: dict, block_c: int):
    """(grid, chunks per segment, number of chunks); the grid is (channel blocks, batch, segments)."""
    n_chunks = triton.cdiv(seqlen, config["block_t"])
    chunks_per_segment = triton.cdiv(n_chunks, config["n_segments"])
    n_segments = triton.cdiv(n_chunks, chunks_per_segment)
    return (triton.cdiv(d_inner, block_c), batch, n_segments), chunks_per_segment, n_chunks


def _meta(A: torch.Tensor, config: dict, block_c: int, num_warps: int) -> dict:
    return dict(D_STATE=A.shape[1], BLOCK_N=triton.next_power_of_2(A.shape[1]), BLOCK_C=block_c,
                BLOCK_T=config["block_t"], num_warps=num_warps)


def _segment_summaries(w, delta, A, M, z, delta_bias, softplus, backward, n_segments, chunks_per_segment, config):
    """Run _segment_kernel: (summaries, decays), each (n_segments, batch, d_inner, d_state) fp32. The forward reads
    the summaries of segments 0..n-2, the backward those of 1..n-1: only those are computed."""
    batch, d_inner, seqlen = delta.shape
    summary = w.new_empty(n_segments, batch, d_inner, A.shape[1], dtype=torch.float32)
    decay = torch.empty_like(summary)
    block_n = triton.next_power_of_2(A.shape[1])
    block_c = config["summary_block_c"]
    _segment_kernel[(triton.cdiv(d_inner, block_c), batch, n_segments - 1)](
        w, delta, A, M, w if z is None else z, delta_bias, summary, decay, d_inner, seqlen,
        chunks_per_segment * config["block_t"], 1 if backward else 0, *delta.stride()[:2], *_row_strides(M),
        D_STATE=A.shape[1], BLOCK_N=block_n,
        BLOCK_C=block_c, BLOCK_T=max(1, config["summary_elements"] // (block_n * block_c)),
        PER_STEP=M.dim() == 3, HAS_Z=z is not None,
        SOFTPLUS=softplus, BACKWARD=backward, num_warps=config["summary_num_warps"])
    return summary, decay


def _row_strides(*Ms: torch.Tensor) -> tuple[int, int]:
    """(batch, state) strides of the per-step ones of B and C, which share them; (0, 0) when both are time-invariant."""
    return next((M.stride()[:2] for M in Ms if M.dim() == 3), (0, 0))


def _time_contiguous(u: torch.Tensor) -> torch.Tensor:
    """u itself when time is its contiguous axis and its layout is dense, so that the outputs and gradients,
    empty_like(u), share it (a (b, d, l) view of a (d, b·l) projection output, say); else a contiguous copy."""
    expected = 1                                     # dense: sorted by stride, each stride the product of the sizes below
    for size, stride in sorted((x for x in zip(u.shape, u.stride()) if x[0] != 1), key=lambda x: x[1]):
        if stride != expected:
            return u.contiguous()
        expected *= size
    return u if u.stride(-1) == 1 or u.shape[-1] == 1 else u.contiguous()


def _in_layout(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """t in the memory layout of like (same shape): t itself when the strides agree, else a copy."""
    if t is None or t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


class SelectiveScanFn(torch.autograd.Function):
    """The fused forward and backward kernels as one differentiable op. u, delta and z (or None) share one layout
    with time contiguous; per-step B and C share theirs, time contiguous; the rest is contiguous. D, delta_bias and
    initial_state are tensors (zeros where the caller gave none)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, config):
        batch, d_inner, seqlen = u.shape
        grid, chunks_per_segment, n_chunks = _launch_shape(batch, d_inner, seqlen, config, config["block_c"])
        meta = _meta(A, config, config["block_c"], config["num_warps"])
        out = torch.empty_like(u)
        last_state = u.new_empty(batch, d_inner, A.shape[1], dtype=torch.float32)
        save = any(ctx.needs_input_grad)                     # keep chunk states only when a backward will come
        chunk_states = u.new_empty(batch, d_inner, n_chunks, A.shape[1], dtype=torch.float32) if save else last_state
        seg_state, seg_decay = (_segment_summaries(u, delta, A, B, None, delta_bias, delta_softplus, False, grid[2],
                                                   chunks_per_segment, config) if grid[2] > 1 else (last_state,) * 2)
        _forward_kernel[grid](u, delta, A, B, C, D, u if z is None else z, delta_bias, initial_state,
                              seg_state, seg_decay, out, chunk_states, last_state, d_inner, seqlen, chunks_per_segment,
                              *u.stride()[:2], *_row_strides(B, C),
                              B_PER_STEP=B.dim() == 3, C_PER_STEP=C.dim() == 3, HAS_Z=z is not None,
                              SOFTPLUS=delta_softplus, SAVE_STATES=save, **meta)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.delta_softplus, ctx.config, ctx.state_dtype = delta_softplus, config, initial_state.dtype
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        config = ctx.config
        batch, d_inner, seqlen = u.shape
        d_state = A.shape[1]
        grid, chunks_per_segment, _ = _launch_shape(batch, d_inner, seqlen, config, config["bwd_block_c"])
        meta = _meta(A, config, config["bwd_block_c"], config["bwd_num_warps"])
        dout = _in_layout(dout, u)
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        # per-step B/C: one fp32 sum over all programs (atomics); time-invariant: partial sums per program
        dB, dC = (torch.zeros(batch, d_state, seqlen, **f32) if M.dim() == 3
                  else torch.empty(grid[2], batch, d_inner, d_state, **f32) for M in (B, C))
        dA = torch.empty(grid[2], batch, d_inner, d_state, **f32)
        dD, dbias = torch.empty(grid[2], batch, d_inner, **f32), torch.empty(grid[2], batch, d_inner, **f32)
        dh0 = torch.empty(batch, d_inner, d_state, **f32)
        seg_grad, seg_decay = (_segment_summaries(dout, delta, A, C, z, delta_bias, ctx.delta_softplus, True,
                                                  grid[2], chunks_per_segment, config) if grid[2] > 1 else (dh0,) * 2)
        _backward_kernel[grid](u, delta, A, B, C, D, u if z is None else z, delta_bias, dout, chunk_states,
                               dlast_state.contiguous(), seg_grad, seg_decay,
                               du, ddelta, du if z is None else dz, dB, dC, dA, dD, dbias, dh0,
                               d_inner, seqlen, chunks_per_segment, *u.stride()[:2], *_row_strides(B, C),
                               B_PER_STEP=B.dim() == 3, C_PER_STEP=C.dim() == 3, HAS_Z=z is not None,
                               SOFTPLUS=ctx.delta_softplus, **meta)
        dB, dC = (dM if M.dim() == 3 else dM.sum((0, 1)) for M, dM in ((B, dB), (C, dC)))
        return (du, ddelta, dA.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.sum((0, 1)).to(D.dtype),
                dz, dbias.sum((0, 1)).to(delta_bias.dtype), dh0.to(ctx.state_dtype), None, None)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                          delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                          initial_state: torch.Tensor | None = None, return_last_state: bool = False,
                          config: dict | None = None):
    """Same arguments and results as selective_scan_ref, on the Triton kernels. `config` overrides tile_config()."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    config = {**tile_config(batch, d_inner, seqlen, u.device), **(config or {})}
    zeros = dict(device=u.device, dtype=torch.float32)
    D = D if D is not None else torch.zeros(d_inner, **zeros)
    delta_bias = delta_bias if delta_bias is not None else torch.zeros(d_inner, **zeros)
    initial_state = initial_state if initial_state is not None else torch.zeros(batch, d_inner, d_state, **zeros)
    u = _time_contiguous(u)
    per_step = [M for M in (B, C) if M.dim() == 3]                # read in place if time-contiguous with one layout
    in_place = all(M.stride(-1) == 1 for M in per_step) and len({M.stride() for M in per_step}) <= 1
    B, C = (M if M.dim() == 3 and in_place else M.contiguous() for M in (B, C))
    out, last_state = SelectiveScanFn.apply(u, _in_layout(delta, u), A.contiguous(), B, C, D.contiguous(),
                                            _in_layout(z, u), delta_bias.contiguous(), initial_state.contiguous(),
                                            delta_softplus, config)
    return (out, last_state) if return_last_state else out
