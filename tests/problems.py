"""Random selective-scan problems and helpers shared by the tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_problem(batch: int, d_inner: int, d_state: int, seqlen: int, seed: int = 0, *, D: bool = True,
                 z: bool = True, delta_bias: bool = True, delta_softplus: bool = True, initial_state: bool = True,
                 B_per_step: bool = True, C_per_step: bool = True, dtype=torch.float32, device="cpu") -> dict:
    """Keyword arguments of selective_scan: inputs in `dtype`, parameters A, D, delta_bias, initial_state in fp32.
    Δ is kept positive without softplus, and its bias non-negative (a negative Δ with a negative A would make the
    state grow exponentially, until the reference itself overflows)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, low_precision=True):
        x = scale * torch.randn(*shape, generator=g)
        return x.to(device=device, dtype=dtype if low_precision else torch.float32)

    delta = (randn(batch, d_inner, seqlen, scale=0.5) if delta_softplus
             else (0.02 + 0.5 * torch.rand(batch, d_inner, seqlen, generator=g)).to(device=device, dtype=dtype))
    non_negative = (lambda x: x) if delta_softplus else torch.abs          # without softplus: bias ≥ 0, Δ + bias > 0
    return dict(
        u=randn(batch, d_inner, seqlen),
        delta=delta,
        A=-torch.exp(randn(d_inner, d_state, scale=0.5, low_precision=False)),
        B=randn(batch, d_state, seqlen) if B_per_step else randn(d_inner, d_state, low_precision=False),
        C=randn(batch, d_state, seqlen) if C_per_step else randn(d_inner, d_state, low_precision=False),
        D=randn(d_inner, low_precision=False) if D else None,
        z=randn(batch, d_inner, seqlen) if z else None,
        delta_bias=non_negative(randn(d_inner, scale=0.5, low_precision=False)) if delta_bias else None,
        delta_softplus=delta_softplus,
        initial_state=randn(batch, d_inner, d_state, low_precision=False) if initial_state else None,
    )


@st.composite
def problems(draw, max_seqlen: int = 40, max_d: int = 5):
    """Small problems over every option: sizes including seqlen 1, odd lengths and non-powers of two."""
    sizes = dict(batch=draw(st.integers(1, 2)), d_inner=draw(st.integers(1, max_d)),
                 d_state=draw(st.integers(1, max_d)), seqlen=draw(st.integers(1, max_seqlen)))
    flags = {name: draw(st.booleans()) for name in
             ("D", "z", "delta_bias", "delta_softplus", "initial_state", "B_per_step", "C_per_step")}
    return make_problem(**sizes, seed=draw(st.integers(0, 2 ** 16)), **flags)


def run(scan, problem: dict, grad_seed: int = 1, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(y, last state, gradients of a random linear function of both w.r.t. every tensor input)."""
    inputs = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in problem.items()}
    y, last = scan(**inputs, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    dy = torch.randn(y.shape, generator=g).to(y.device)
    dlast = torch.randn(last.shape, generator=g).to(last.device)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    grads = torch.autograd.grad((y.float() * dy).sum() + (last * dlast).sum(), list(leaves.values()),
                                allow_unused=True, materialize_grads=True)   # e.g. dA = 0 when seqlen 1, h_{-1} = 0
    return y.detach(), last.detach(), dict(zip(leaves, grads))


FP32_TOL = 1e-4


def tolerance(dtype: torch.dtype) -> float:
    """1e-4 in fp32; in bf16/fp16, 2·eps of the dtype: both sides compute in fp32 from the same inputs and may
    differ by one unit in the last place of the rounded output, plus fp32 summation-order noise."""
    return FP32_TOL if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "", scale: float = 0.0) -> None:
    """|actual - expected| <= tol·|expected| + tol·max(max|expected|, 1e-3·scale).

    Relative, with an absolute floor at the tensor's own magnitude (an element that cancels to ~0 can't be held to a
    relative bound). `scale` is the problem's magnitude (the largest reference result): a tensor that is exactly zero
    by structure — dA when seqlen is 1 and h_{-1} = 0 — is met on a GPU by the rounding noise of terms that cancel
    (FMA contraction of h - B̄u: ~eps · their size), so its floor is tol·1e-3·scale, i.e. 1e-7 of the problem's
    magnitude in fp32: still far below any wrong term."""
    actual, expected = actual.float(), expected.float()
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    floor = tol * max(magnitude, 1e-3 * scale, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=floor, msg=lambda m: f"{name}: {m}")


def assert_same_results(result, expected, tol: float) -> None:
    (y, last, grads), (y_ref, last_ref, grads_ref) = result, expected
    scale = max(x.float().abs().max().item() for x in [y_ref, last_ref, *grads_ref.values()] if x.numel())
    assert_close(y, y_ref, tol, "y", scale)
    assert_close(last, last_ref, tol, "last state", scale)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], tol, f"d{name}", scale)
