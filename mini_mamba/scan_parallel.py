"""The selective scan as a parallel (log-depth) scan in plain PyTorch — differentiable by autograd.

Same function as scan_ref.py (Gu & Dao 2023, Algorithm 2), computed the way section 3.3.2 ("parallel scan") says the
hardware-aware kernel does: the recurrence h_t = Ā_t h_{t-1} + b_t, with b_t = Δ_t B_t u_t, is a scan over the pairs
(Ā_t, b_t) under the operator

    (a₁, b₁) ∘ (a₂, b₂) = (a₁ a₂,  a₂ b₁ + b₂)        "first apply step 1, then step 2"

Why it is associative: each pair stands for the affine map h ↦ a h + b, and ∘ is the composition of two such maps
(first map 1, then map 2). Composition of functions is associative, so any bracketing — in particular a balanced tree —
gives the same prefix results as the left-to-right loop. (The a's are diagonal, so everything is elementwise.)

The scan below is the work-efficient odd/even recursion (Blelloch-style): combine neighbours (0,1), (2,3), ... into
L/2 pairs, scan those recursively — which yields every odd prefix — then finish each even position with one more
combine. Work: O(L) combines (L/2 + L/4 + ... twice over); depth: 2·log₂L sequential steps, each a batch of
elementwise tensor ops. The loop of scan_ref.py has depth L.

Memory: unlike the loop, which keeps one state (batch, d_inner, d_state), this materialises every state:
Ā and b are (batch, d_inner, d_state, seqlen) tensors, and autograd keeps about as much again for the backward —
d_state times the size of the input. That is the cost the fused kernel (scan_triton.py) avoids by keeping states in
registers and recomputing them in the backward pass.
"""
from __future__ import annotations

import torch
from einops import rearrange

from .scan_ref import discretize, finish, per_step


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All prefixes h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along the last dim, by the odd/even recursion. a, b: (..., L)."""
    L = a.shape[-1]
    if L == 1:
        return b
    m = L // 2
    a_left, a_right = a[..., 0:2 * m:2], a[..., 1:2 * m:2]              # (..., m) each: the pairs (0,1), (2,3), ...
    b_left, b_right = b[..., 0:2 * m:2], b[..., 1:2 * m:2]
    h_odd = linear_scan(a_left * a_right, a_right * b_left + b_right)    # prefixes ending at 1, 3, 5, ...
    h_even = a[..., 2::2] * h_odd[..., :(L - 1) // 2] + b[..., 2::2]    # prefixes ending at 2, 4, ...: one more step
    h_even = torch.cat([b[..., :1], h_even], dim=-1)                     # the prefix ending at 0 is b_0 itself
    interleaved = rearrange(torch.stack([h_even[..., :m], h_odd], dim=-1), "... m two -> ... (m two)")
    return torch.cat([interleaved, h_even[..., m:]], dim=-1)            # odd L: the last even prefix goes at the end


def selective_scan_parallel(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                            delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                            initial_state: torch.Tensor | None = None, return_last_state: bool = False):
    """Same arguments and results as selective_scan_ref, computed with a log-depth scan over time."""
    out_dtype = u.dtype
    u, delta = discretize(u, delta, delta_bias, delta_softplus)
    B, C = per_step(B, u.dtype), per_step(C, u.dtype)                     # (batch|1, d_inner|1, seqlen|1, d_state)
    A_bar = torch.exp(delta[..., None] * A.to(u.dtype)[:, None, :])      # (batch, d_inner, seqlen, d_state)
    Bu = (delta * u)[..., None] * B                                       # (batch, d_inner, seqlen, d_state)
    if initial_state is not None:                                         # fold h_{-1} into the first step
        Bu = torch.cat([Bu[:, :, :1] + A_bar[:, :, :1] * initial_state.to(u.dtype)[:, :, None], Bu[:, :, 1:]], dim=2)
    h = linear_scan(rearrange(A_bar, "b d l n -> b d n l"), rearrange(Bu, "b d l n -> b d n l"))
    h = rearrange(h, "b d n l -> b d l n")                                # (batch, d_inner, seqlen, d_state)
    y = (h * C).sum(-1)                                                   # (batch, d_inner, seqlen)
    out = finish(y, u, D, z, out_dtype)
    return (out, h[:, :, -1]) if return_last_state else out
