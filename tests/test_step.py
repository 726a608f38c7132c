"""The decoding-step kernels (step_triton.py) against one step of the reference loop (scan_ref.py) and against
mamba.py's PyTorch step; on a CPU they run in Triton's interpreter."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mini_mamba.scan_ref import selective_scan_ref
from mini_mamba.step_triton import add_rms_norm, conv_step, ssm_step

from .conftest import DEVICE
from .problems import FP32_TOL, assert_close, make_problem, tolerance


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), d_inner=st.integers(1, 200), d_state=st.integers(1, 17), seed=st.integers(0, 999),
       flags=st.fixed_dictionaries({k: st.booleans() for k in ("D", "z", "delta_bias", "delta_softplus")}),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       parameter_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_ssm_step_is_one_step_of_the_reference_loop(batch, d_inner, d_state, seed, flags, dtype, parameter_dtype):
    """d_inner up to 200 crosses the kernel's 128-channel blocks; d_state need not be a power of two. The kernel takes
    A_log, D and Δ's bias as a model stores them (bf16 in a bf16 model) and computes with them in fp32."""
    p = make_problem(batch, d_inner, d_state, 1, seed, **flags, dtype=dtype, device=DEVICE)
    A_log = torch.log(-p["A"]).to(parameter_dtype)                     # A = -exp(A_log), as the block stores it
    stored = {k: None if p[k] is None else p[k].to(parameter_dtype) for k in ("D", "delta_bias")}
    p.update(A=-torch.exp(A_log.float()), **{k: None if v is None else v.float() for k, v in stored.items()})
    y_ref, h_ref = selective_scan_ref(**p, return_last_state=True)
    h = p["initial_state"].clone()
    y = ssm_step(h, p["u"][..., 0], p["delta"][..., 0], A_log, p["B"][..., 0], p["C"][..., 0], stored["D"],
                 None if p["z"] is None else p["z"][..., 0], stored["delta_bias"], p["delta_softplus"])
    assert y.dtype == dtype
    assert_close(y, y_ref[..., 0], tolerance(dtype), "y")
    assert_close(h, h_ref, FP32_TOL, "state")


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), d_inner=st.integers(1, 200), dt_rank=st.integers(1, 50), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_ssm_step_computes_delta_from_its_low_rank_input(batch, d_inner, dt_rank, seed, dtype):
    """With dt_weight, the kernel is given dt (b, dt_rank) and forms Δ = dt · dt_weightᵀ itself (dt_proj's product
    in the Mamba block): the same step as with that Δ given, to fp32 rounding."""
    p = make_problem(batch, d_inner, 4, 1, seed, dtype=dtype, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    dt = torch.randn(batch, dt_rank, generator=g).to(DEVICE, dtype)
    dt_weight = (torch.randn(d_inner, dt_rank, generator=g) / dt_rank ** 0.5).to(DEVICE, dtype)
    A_log = torch.log(-p["A"])
    step = lambda h, delta, **kw: ssm_step(h, p["u"][..., 0], delta, A_log, p["B"][..., 0], p["C"][..., 0], p["D"],
                                            p["z"][..., 0], p["delta_bias"], True, **kw)
    h, h_fused = p["initial_state"].clone(), p["initial_state"].clone()
    y = step(h, (dt.float() @ dt_weight.float().t()))                  # Δ computed outside, in fp32
    y_fused = step(h_fused, dt, dt_weight=dt_weight)
    assert_close(y_fused, y, tolerance(dtype), "y")
    assert_close(h_fused, h, FP32_TOL, "state")


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), d_inner=st.integers(1, 200), d_conv=st.integers(2, 5), bias=st.booleans(),
       seed=st.integers(0, 999))
def test_conv_step_is_the_causal_conv_on_the_newest_input(batch, d_inner, d_conv, bias, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    x, state, weight = rand(batch, 2 * d_inner)[:, :d_inner], rand(batch, d_inner, d_conv - 1), rand(d_inner, d_conv)
    b = rand(d_inner) if bias else None
    window = torch.cat([state, x[..., None]], dim=-1)                  # (batch, d_inner, d_conv)
    expected = F.silu(F.conv1d(window, weight[:, None], b, groups=d_inner))[..., 0]
    out = conv_step(x, state, weight, b)                                # x is a strided slice, as in_proj gives it
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, window[..., 1:])                         # shifted in place, newest input last


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")     # PyTorch's side, unfused
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), d_model=st.integers(1, 300), add=st.booleans(), seed=st.integers(0, 999),
       dtypes=st.tuples(*[st.sampled_from([torch.float32, torch.bfloat16])] * 3))
def test_add_rms_norm_is_the_residual_add_then_rms_norm(batch, d_model, add, seed, dtypes):
    """The kernel between two blocks of a decoding step against PyTorch's x + y and nn.RMSNorm's F.rms_norm, with
    the stream (x), the block's output (y) and the norm's weight each in fp32 or bf16 — a bf16 model, or an fp32 one
    under bf16 autocast (an fp32 stream plus a bf16 output). y is a strided slice, as out_proj's output may be."""
    g = torch.Generator().manual_seed(seed)
    x_dtype, y_dtype, w_dtype = dtypes
    x = torch.randn(batch, d_model, generator=g).to(DEVICE, x_dtype)
    y = torch.randn(batch, 2 * d_model, generator=g).to(DEVICE, y_dtype)[:, :d_model] if add else None
    weight = torch.randn(d_model, generator=g).to(DEVICE, w_dtype)
    r = x + y if add else x
    expected = F.rms_norm(r, (d_model,), weight, 1e-5)
    residual, out = add_rms_norm(x, y, weight, 1e-5)
    assert residual.dtype == r.dtype and out.dtype == expected.dtype
    assert_close(residual, r, tolerance(r.dtype), "residual")         # one fp32 add, rounded once (to 1 ulp)
    assert_close(out, expected, tolerance(out.dtype), "normed")


def test_step_kernels_reject_a_non_contiguous_state():
    state = torch.zeros(2, 3, 8, device=DEVICE)[..., ::2]
    with pytest.raises(AssertionError):
        conv_step(torch.zeros(2, 3, device=DEVICE), state, torch.zeros(3, 5, device=DEVICE), None)
