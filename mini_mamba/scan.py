"""selective_scan(...): the one public entry point to the selective scan (Gu & Dao 2023, section 3, Algorithm 2).

Same argument names, meanings and layout as the official package's `selective_scan_fn`, so code written against one
runs on the other, plus `initial_state`. It checks its inputs (a clear error naming the argument and what was expected)
and picks an implementation:

    "ref"        scan_ref.py       the specification: a loop over time
    "parallel"   scan_parallel.py  a log-depth scan in plain PyTorch
    "triton"     scan_triton.py    the fused GPU kernel (on CPU too, under TRITON_INTERPRET=1: slow, for tests)
    "auto"       the Triton kernel on CUDA; on CPU the loop, or the parallel scan when one time step is so small
                 (batch·d_inner·d_state < 8192) that the loop's per-step overhead dominates — measured on 2 cores:
                 parallel 6× faster at 2·64·16 × 4096 steps, the loop 1.7× faster at 8·128·16 × 256 steps.
"""
from __future__ import annotations

import os

import torch

from .scan_parallel import selective_scan_parallel
from .scan_ref import selective_scan_ref

IMPLEMENTATIONS = ("auto", "ref", "parallel", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _expect(ok: bool, message: str, error: type = ValueError) -> None:
    if not ok:
        raise error(f"selective_scan: {message}")


def _check_shape(name: str, x: torch.Tensor | None, *shapes: tuple[int, ...]) -> None:
    """x must be a floating tensor with one of the given shapes (when x is given at all)."""
    if x is None:
        return
    _expect(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
    _expect(x.dtype in FLOAT_DTYPES, f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}", TypeError)
    wanted = " or ".join(str(tuple(s)) for s in shapes)
    _expect(tuple(x.shape) in [tuple(s) for s in shapes], f"{name} must have shape {wanted}, got {tuple(x.shape)}")


def check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise a ValueError / TypeError naming the first argument whose rank, shape, dtype or device is wrong."""
    _expect(isinstance(u, torch.Tensor), f"u must be a torch.Tensor, got {type(u).__name__}", TypeError)
    _expect(u.dim() == 3, f"u must be 3-D (batch, d_inner, seqlen), got shape {tuple(u.shape)}")
    batch, d_inner, seqlen = u.shape
    _expect(seqlen >= 1, "u must hold at least one time step (seqlen >= 1)")
    _check_shape("u", u, (batch, d_inner, seqlen))
    _check_shape("delta", delta, (batch, d_inner, seqlen))
    _expect(isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[0] == d_inner,
            f"A must be 2-D (d_inner={d_inner}, d_state), got "
            f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    _expect(not A.is_complex(), "A must be real (complex A is not supported)", TypeError)
    d_state = A.shape[1]
    _check_shape("A", A, (d_inner, d_state))
    for name, M in (("B", B), ("C", C)):
        _expect(M is not None, f"{name} is required")
        _check_shape(name, M, (batch, d_state, seqlen), (d_inner, d_state))
    _check_shape("D", D, (d_inner,))
    _check_shape("z", z, (batch, d_inner, seqlen))
    _check_shape("delta_bias", delta_bias, (d_inner,))
    _check_shape("initial_state", initial_state, (batch, d_inner, d_state))
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    for name, x in named.items():
        if x is not None:
            _expect(x.device == u.device, f"{name} is on {x.device} but u is on {u.device}: all tensors must be on "
                    "one device")


def _triton_runs_here(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def choose_impl(impl: str, u: torch.Tensor, A: torch.Tensor) -> str:
    """The implementation `impl` stands for, for inputs like u (see the module docstring)."""
    _expect(impl in IMPLEMENTATIONS, f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        if u.device.type == "cuda" and u.dtype in TRITON_DTYPES:
            return "triton"
        batch, d_inner, _ = u.shape
        return "parallel" if batch * d_inner * A.shape[1] < 8192 else "ref"
    if impl == "triton":
        _expect(_triton_runs_here(u.device), f"impl='triton' needs CUDA tensors (u is on {u.device}); on a CPU set "
                "TRITON_INTERPRET=1 before importing mini_mamba to run the kernel in Triton's interpreter",
                RuntimeError)
        _expect(u.dtype in TRITON_DTYPES, f"impl='triton' takes float32, float16 or bfloat16 inputs, got {u.dtype}",
                TypeError)
    return impl


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   initial_state: torch.Tensor | None = None, return_last_state: bool = False, impl: str = "auto"):
    """y = SSM(A, B, C, D)(u) with input-dependent Δ, B, C (Algorithm 2); y · silu(z) when z is given.

    u, delta, z: (batch, d_inner, seqlen); A: (d_inner, d_state); B, C: (batch, d_state, seqlen) or (d_inner, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state).
    Returns y (batch, d_inner, seqlen) in u's dtype, and the last state (batch, d_inner, d_state) in fp32 when
    return_last_state. Differentiable with respect to every tensor argument.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    impl = choose_impl(impl, u, A)
    if impl == "triton":
        from .scan_triton import selective_scan_triton as scan   # imported on first use: Triton is heavy to load
    else:
        scan = selective_scan_ref if impl == "ref" else selective_scan_parallel
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
