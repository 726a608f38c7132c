"""One decoding step of the Mamba language model as small Triton kernels: the recurrent mode of Gu & Dao 2023,
section 3.3 ("the model ... can be computed recurrently, one token at a time, in constant time and memory").

Generating a token runs, per layer, the causal conv1d on the newest input and one step of the SSM. Written with
PyTorch ops (mamba.py's reference path) that is some 30 tiny kernels per layer, each reading and writing the state;
here it is two launches, and each state is read once and written once, in place:

    conv_step   window = [conv_state, x_t]          conv_state (b, d_inner, d_conv-1) shifts left and takes x_t
                x_conv = silu(Σ_k w_k window_k + bias)
    ssm_step    Δ = dt · W_dtᵀ  (optional)          dt_proj's product, for the channels of the program
                Δ = softplus(Δ + delta_bias)        h (b, d_inner, d_state), fp32, updated in place
                A = -exp(A_log)                     the Mamba block's parameters as stored (any float dtype):
                h = exp(Δ A) h + Δ B u              A, D and the bias are made fp32 here, not by kernels
                y = C·h + D u, gated by silu(z)     of their own at every token

Between the blocks, a third kernel takes one block's residual add and the next block's RMSNorm together:

    add_rms_norm  r = x + y                         the residual stream, rounded as PyTorch's add rounds it
                  r / sqrt(mean(r²) + eps) · w      the next block's input (or the final norm's, before the head)

A decoding step is a few microseconds of work per kernel at small batch, so what it costs is mostly how many kernels
it launches: six a layer, with the three matrix products.

The same equations as one iteration of scan_ref.py's loop and as nn.RMSNorm; the tests hold these kernels to them
and to mamba.py's PyTorch step. Runs on CUDA, or on a CPU under TRITON_INTERPRET=1 (set before import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scan_triton import _softplus

BLOCK_D = 128                         # channels per program


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, D_INNER, stride_x, stride_out,
                      D_CONV: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                            # (BLOCK,) channels
    mask = d < D_INNER
    x = tl.load(x_ptr + b * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    acc = x * tl.load(w_ptr + d * D_CONV + D_CONV - 1, mask=mask, other=0.0).to(tl.float32)
    row = state_ptr + (b * D_INNER + d) * (D_CONV - 1)                            # this channel's last inputs
    for k in tl.static_range(D_CONV - 1):
        past = tl.load(row + k, mask=mask, other=0.0)
        acc += past.to(tl.float32) * tl.load(w_ptr + d * D_CONV + k, mask=mask, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(row + k - 1, past, mask=mask)                                # shift the window left
    tl.store(row + D_CONV - 2, x.to(state_ptr.dtype.element_ty), mask=mask)     # the newest input enters
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out + d, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ssm_step_kernel(h_ptr, u_ptr, delta_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dt_w_ptr, y_ptr,
                     D_INNER, DT_RANK, stride_u, stride_delta, stride_B, stride_C, stride_z, stride_y,
                     D_STATE: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                            # (BLOCK,) channels
    n = tl.arange(0, N_PAD)                                                       # (N_PAD,) state index
    mask = d < D_INNER
    dn_mask = mask[:, None] & (n[None, :] < D_STATE)
    u = tl.load(u_ptr + b * stride_u + d, mask=mask, other=0.0).to(tl.float32)
    if R_PAD > 0:                                            # Δ = dt · W_dtᵀ: dt (DT_RANK,), W_dt (d_inner, DT_RANK)
        r = tl.arange(0, R_PAD)
        dt = tl.load(delta_ptr + b * stride_delta + r, mask=r < DT_RANK, other=0.0).to(tl.float32)
        W = tl.load(dt_w_ptr + d[:, None] * DT_RANK + r[None, :], mask=mask[:, None] & (r[None, :] < DT_RANK),
                    other=0.0).to(tl.float32)
        delta = tl.sum(W * dt[None, :], axis=1)                                  # (BLOCK,)
    else:
        delta = tl.load(delta_ptr + b * stride_delta + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += tl.load(bias_ptr + d, mask=mask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        delta = _softplus(delta)
    A_log = tl.load(A_log_ptr + d[:, None] * D_STATE + n[None, :], mask=dn_mask, other=0.0)  # (BLOCK, N_PAD)
    A = -tl.exp(A_log.to(tl.float32))
    B = tl.load(B_ptr + b * stride_B + n, mask=n < D_STATE, other=0.0).to(tl.float32)       # (N_PAD,)
    C = tl.load(C_ptr + b * stride_C + n, mask=n < D_STATE, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + (b * D_INNER + d[:, None]) * D_STATE + n[None, :]
    h = tl.load(h_ptrs, mask=dn_mask, other=0.0)
    h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]       # h_t = Ā h_{t-1} + B̄ u_t
    tl.store(h_ptrs, h, mask=dn_mask)
    y = tl.sum(h * C[None, :], axis=1)                                            # y_t = C·h_t
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_z + d, mask=mask, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, residual_ptr, out_ptr, D_MODEL, eps, stride_x, stride_y,
                         BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
    b = tl.program_id(0)                                                          # one row per program
    d = tl.arange(0, BLOCK)
    mask = d < D_MODEL
    r = tl.load(x_ptr + b * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        r += tl.load(y_ptr + b * stride_y + d, mask=mask, other=0.0).to(tl.float32)
        r = r.to(residual_ptr.dtype.element_ty)                                   # the stream's dtype, as x + y
        tl.store(residual_ptr + b * D_MODEL + d, r, mask=mask)
        r = r.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / D_MODEL + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * D_MODEL + d, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> int:
    """The row stride of a (batch, features) tensor whose features are contiguous (slices of a wider one are fine)."""
    assert x.dim() == 2 and x.stride(1) == 1, "expected (batch, features) with contiguous features"
    return x.stride(0)


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
    """x (b, d_inner), the newest conv input -> silu(causal conv over [conv_state, x]) (b, d_inner), in x's dtype.
    conv_state (b, d_inner, d_conv-1), contiguous, takes x in place; weight (d_inner, d_conv)."""
    batch, d_inner = x.shape
    assert conv_state.is_contiguous() and weight.is_contiguous()
    out = torch.empty(batch, d_inner, device=x.device, dtype=x.dtype)
    grid = (batch, triton.cdiv(d_inner, BLOCK_D))
    _conv_step_kernel[grid](x, conv_state, weight, bias if bias is not None else weight, out, d_inner, _rows(x),
                            out.stride(0), D_CONV=weight.shape[1], BLOCK=BLOCK_D, HAS_BIAS=bias is not None)
    return out


def ssm_step(h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
             dt_weight: torch.Tensor | None = None) -> torch.Tensor:
    """One step of the selective SSM with A = -exp(A_log). h (b, d_inner, d_state) fp32 contiguous, updated in place;
    u, delta, z (b, d_inner); A_log (d_inner, d_state); B, C (b, d_state); D, delta_bias (d_inner,) — the parameters
    in any float dtype, computed with in fp32. With dt_weight (d_inner, dt_rank), contiguous, delta is dt (b, dt_rank)
    and the kernel computes Δ = dt · dt_weightᵀ itself (the block's dt_proj product, one launch fewer a layer).
    Returns y (b, d_inner) in u's dtype."""
    batch, d_inner = u.shape
    d_state = A_log.shape[1]
    assert h.is_contiguous() and h.dtype == torch.float32 and A_log.is_contiguous()
    assert dt_weight is None or (dt_weight.is_contiguous() and dt_weight.shape == (d_inner, delta.shape[1]))
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    some = u                                                                      # any pointer for absent tensors
    grid = (batch, triton.cdiv(d_inner, BLOCK_D))
    _ssm_step_kernel[grid](h, u, delta, A_log, B, C, D if D is not None else some, z if z is not None else some,
                           delta_bias if delta_bias is not None else some, some if dt_weight is None else dt_weight, y,
                           d_inner, 0 if dt_weight is None else delta.shape[1], _rows(u), _rows(delta), _rows(B),
                           _rows(C), _rows(z) if z is not None else 0, y.stride(0), D_STATE=d_state,
                           N_PAD=triton.next_power_of_2(d_state), BLOCK=BLOCK_D, SOFTPLUS=delta_softplus,
                           HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                           R_PAD=0 if dt_weight is None else triton.next_power_of_2(delta.shape[1]))
    return y


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, rms_norm(r) · weight) with r = x + y (b, d_model): a block's residual add and the next block's RMSNorm as
    one kernel. y None: r is x (the first block). r has the dtype x + y has; the norm, r's dtype (as nn.RMSNorm);
    eps None: the dtype's machine epsilon, as nn.RMSNorm."""
    batch, d_model = x.shape
    assert weight.is_contiguous() and weight.shape == (d_model,)
    dtype = x.dtype if y is None else torch.result_type(x, y)
    residual = x if y is None else torch.empty(batch, d_model, device=x.device, dtype=dtype)
    out = torch.empty(batch, d_model, device=x.device, dtype=dtype)
    eps = torch.finfo(dtype).eps if eps is None else eps
    _add_rms_norm_kernel[(batch,)](x, x if y is None else y, weight, residual, out, d_model, eps, _rows(x),
                                   0 if y is None else _rows(y), BLOCK=triton.next_power_of_2(d_model),
                                   HAS_Y=y is not None)
    return residual, out
