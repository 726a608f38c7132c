"""The selective scan, written as the specification: a plain loop over time, state in fp32 (fp64 for fp64 inputs).

This is Algorithm 2 of Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023),
section 3.2 ("Improving SSMs with Selection") with the zero-order-hold discretisation of section 2 (eq. 4), as the
official `selective_scan_fn` computes it. Every other implementation in this package (scan_parallel.py, scan_triton.py)
is held to this one by the tests.

Glossary (code symbol -> paper):
    batch, d_inner, seqlen, d_state     B, D (= E·d_model, the expanded width), L, N
    u        (batch, d_inner, seqlen)   the input sequence x of the SSM
    delta    (batch, d_inner, seqlen)   Δ, the input-dependent step size; softplus(Δ + delta_bias) when delta_softplus
    A        (d_inner, d_state)         A, a diagonal state matrix per channel (real, negative for a stable system)
    B        (batch, d_state, seqlen)   B, input-dependent ("selective") ... or (d_inner, d_state), time-invariant
    C        (batch, d_state, seqlen)   C, likewise
    D        (d_inner,)                 D, the skip connection
    z        (batch, d_inner, seqlen)   the gate branch of the Mamba block: y <- y · silu(z)
    h        (batch, d_inner, d_state)  the hidden state h_t
    A_bar    exp(Δ_t A)                 Ā, zero-order hold of A (eq. 4)
    B_bar u  Δ_t B_t u_t                B̄u, the simplified (Euler) discretisation of B used by the official kernel

The recurrence (eq. 2a-2b with the selection of Algorithm 2):
    h_t = Ā_t ⊙ h_{t-1} + Δ_t B_t u_t,     y_t = C_t · h_t + D u_t,     h_{-1} = initial_state (or 0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def discretize(u: torch.Tensor, delta: torch.Tensor, delta_bias: torch.Tensor | None,
               delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """u and Δ in fp32 (fp64 stays fp64), with Δ <- softplus(Δ + delta_bias) when asked (section 3.6)."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(dtype), delta.to(dtype)                  # (batch, d_inner, seqlen)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def per_step(M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B or C as (batch | 1, d_inner | 1, seqlen | 1, d_state), broadcastable against (batch, d_inner, seqlen, d_state)."""
    if M.dim() == 2:                                          # time-invariant (d_inner, d_state)
        return rearrange(M.to(dtype), "d n -> 1 d 1 n")
    return rearrange(M.to(dtype), "b n l -> b 1 l n")        # selective (batch, d_state, seqlen)


def finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
           out_dtype: torch.dtype) -> torch.Tensor:
    """y + D·u, gated by silu(z), cast back to the input dtype. y, u, z: (batch, d_inner, seqlen)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       initial_state: torch.Tensor | None = None, return_last_state: bool = False):
    """The selective scan as a sequential loop over time (Algorithm 2). Returns y (u's dtype), and h_L (fp32; fp64 for
    fp64 inputs) when asked."""
    out_dtype = u.dtype
    u, delta = discretize(u, delta, delta_bias, delta_softplus)
    batch, d_inner, seqlen = u.shape
    A = A.to(u.dtype)                                         # (d_inner, d_state)
    B, C = per_step(B, u.dtype), per_step(C, u.dtype)         # (batch|1, d_inner|1, seqlen|1, d_state)
    h = u.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.to(u.dtype)
    ys = []
    for t in range(seqlen):
        B_t, C_t = (M[:, :, min(t, M.shape[2] - 1)] for M in (B, C))             # time-invariant: one "step" for all
        A_bar = torch.exp(delta[:, :, t, None] * A)                               # (batch, d_inner, d_state)
        h = A_bar * h + delta[:, :, t, None] * B_t * u[:, :, t, None]             # h_t = Ā_t h_{t-1} + B̄_t u_t
        ys.append((h * C_t).sum(-1))                                               # y_t = C_t · h_t, (batch, d_inner)
    y = torch.stack(ys, dim=-1)                                                    # (batch, d_inner, seqlen)
    out = finish(y, u, D, z, out_dtype)
    return (out, h) if return_last_state else out
