"""The Mamba block's short causal convolution and its SiLU (Gu & Dao 2023, section 3.4 and Figure 3: a depthwise conv1d
of width d_conv = 4 over the SSM branch before the scan) as one Triton kernel, forward and backward.

    a[b, c, t]   = bias[c] + Σ_k w[c, k] · x[b, c, t - (K-1) + k]        (x = 0 before the sequence starts)
    out[b, c, t] = silu(a[b, c, t])

nn.Conv1d computes the same with padding K-1 and the last K-1 outputs dropped (mamba.py's reference path), but through
PyTorch's generic depthwise kernel and only on a contiguous (b, d, l) input. Here x may have any strides, so the
kernel reads in_proj's output where it lies, and writes out with time contiguous, as the scan reads it: in x's stride
order when time is contiguous in x (the Mamba block's channel-major x, say), else as a contiguous (b, d, l).

Backward, from dout = ∂L/∂out: da = dout · silu'(a), with a recomputed; then
    dx[b, c, s] = Σ_k w[c, k] · da[b, c, s + (K-1) - k]      dw[c, k] = Σ_b,t da[b, c, t] · x[b, c, t - (K-1) + k]
    dbias[c]   = Σ_b,t da[b, c, t]
each program adding its tile's share of dw and dbias into fp32 buffers. tests/test_conv.py holds both directions to
nn.Conv1d and autograd. Runs on CUDA, or on a CPU under TRITON_INTERPRET=1 (set before import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C, BLOCK_T = 32, 64             # channels × time steps per program


@triton.jit
def _tap(x_ptr, b, c, t, k, L, D, stride_b, stride_c, stride_t, K: tl.constexpr):
    """x[b, c, t - (K-1) + k] for the tile's channels c and steps t, in fp32; 0 outside the sequence."""
    s = t - (K - 1) + k
    mask = (c[:, None] < D) & (s[None, :] >= 0) & (s[None, :] < L)
    ptrs = x_ptr + b * stride_b + c[:, None] * stride_c + s[None, :] * stride_t
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _preactivation(x_ptr, w_ptr, bias_ptr, b, c, t, L, D, stride_b, stride_c, stride_t,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    """a = bias + Σ_k w_k · x(t - (K-1) + k) on a (BC channels, BT steps) tile, fp32."""
    a = tl.zeros((BC, BT), dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + c * K + k, mask=c < D, other=0.0).to(tl.float32)
        a += w[:, None] * _tap(x_ptr, b, c, t, k, L, D, stride_b, stride_c, stride_t, K)
    if HAS_BIAS:
        a += tl.load(bias_ptr + c, mask=c < D, other=0.0).to(tl.float32)[:, None]
    return a


@triton.jit
def _conv_forward_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, L, D, stride_b, stride_c, stride_t,
                         out_stride_b, out_stride_c, out_stride_t,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    b, c, t = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC), tl.program_id(2) * BT + tl.arange(0, BT)
    a = _preactivation(x_ptr, w_ptr, bias_ptr, b, c, t, L, D, stride_b, stride_c, stride_t, K, HAS_BIAS, BC, BT)
    mask = (c[:, None] < D) & (t[None, :] < L)
    out = a * tl.sigmoid(a)                                                        # silu
    ptrs = out_ptr + b * out_stride_b + c[:, None] * out_stride_c + t[None, :] * out_stride_t
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_backward_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, L, D,
                          stride_b, stride_c, stride_t, dout_stride_b, dout_stride_c, dout_stride_t,
                          dx_stride_b, dx_stride_c, dx_stride_t,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    b, c, t = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC), tl.program_id(2) * BT + tl.arange(0, BT)
    dx = tl.zeros((BC, BT), dtype=tl.float32)
    for j in tl.static_range(K):                     # dx(t) = Σ_j w_{K-1-j} · da(t + j): da at t, t+1, ..., t+K-1
        tj = t + j
        a = _preactivation(x_ptr, w_ptr, bias_ptr, b, c, tj, L, D, stride_b, stride_c, stride_t, K, HAS_BIAS, BC, BT)
        mask = (c[:, None] < D) & (tj[None, :] < L)
        dout_ptrs = dout_ptr + b * dout_stride_b + c[:, None] * dout_stride_c + tj[None, :] * dout_stride_t
        dout = tl.load(dout_ptrs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        da = dout * sig * (1 + a * (1 - sig))                                      # silu'(a) = σ(a)(1 + a(1 - σ(a)))
        w = tl.load(w_ptr + c * K + (K - 1 - j), mask=c < D, other=0.0).to(tl.float32)
        dx += w[:, None] * da
        if j == 0:                                   # this tile's share of dw and dbias: from da at its own steps
            for k in tl.static_range(K):
                x_k = _tap(x_ptr, b, c, t, k, L, D, stride_b, stride_c, stride_t, K)
                tl.atomic_add(dw_ptr + c * K + k, tl.sum(da * x_k, axis=1), mask=c < D)
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + c, tl.sum(da, axis=1), mask=c < D)
    mask = (c[:, None] < D) & (t[None, :] < L)
    ptrs = dx_ptr + b * dx_stride_b + c[:, None] * dx_stride_c + t[None, :] * dx_stride_t
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, d: int, seqlen: int) -> tuple[int, int, int]:
    return batch, triton.cdiv(d, BLOCK_C), triton.cdiv(seqlen, BLOCK_T)


class CausalConv1dSiLU(torch.autograd.Function):
    """silu(causal depthwise conv1d) as one differentiable op on the kernels above."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, d, seqlen = x.shape
        out = (torch.empty_like(x) if x.stride(-1) == 1 else                      # time contiguous, for the scan
               torch.empty(batch, d, seqlen, device=x.device, dtype=x.dtype))
        _conv_forward_kernel[_grid(batch, d, seqlen)](x, weight, bias if bias is not None else weight, out, seqlen,
                                                     d, *x.stride(), *out.stride(), K=weight.shape[1],
                                                     HAS_BIAS=bias is not None, BC=BLOCK_C, BT=BLOCK_T)
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        batch, d, seqlen = x.shape
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
        dbias = torch.zeros(d, device=x.device, dtype=torch.float32)
        _conv_backward_kernel[_grid(batch, d, seqlen)](x, weight, bias if bias is not None else weight, dout, dx, dw,
                                                      dbias, seqlen, d, *x.stride(), *dout.stride(), *dx.stride(),
                                                      K=weight.shape[1],
                                                      HAS_BIAS=bias is not None, BC=BLOCK_C, BT=BLOCK_T)
        return dx, dw.to(weight.dtype), None if bias is None else dbias.to(bias.dtype)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv1d of x): x (b, d, l), any strides; weight (d, d_conv) contiguous; bias (d,) or None.
    Returns (b, d, l) in x's dtype, time contiguous (see above); differentiable in x, weight and bias."""
    assert x.dim() == 3 and weight.dim() == 2 and weight.shape[0] == x.shape[1] and weight.is_contiguous()
    return CausalConv1dSiLU.apply(x, weight, bias)
