"""The causal conv1d + SiLU kernel (conv_triton.py) against nn.Conv1d's causal convolution and autograd; on a CPU it
runs in Triton's interpreter."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mini_mamba.conv_triton import causal_conv1d_silu

from .conftest import DEVICE


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """mamba.py's reference path: padding d_conv - 1 on both sides, the last d_conv - 1 outputs dropped."""
    seqlen, d_conv = x.shape[-1], weight.shape[1]
    return F.silu(F.conv1d(x, weight[:, None], bias, padding=d_conv - 1, groups=x.shape[1])[..., :seqlen])


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), d=st.integers(1, 40), seqlen=st.integers(1, 70), d_conv=st.integers(2, 5),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "(b, l, 2d)", "(2d, b·l)"]), seed=st.integers(0, 999))
def test_the_kernel_is_the_causal_conv_and_silu_with_its_gradients(batch, d, seqlen, d_conv, bias, layout, seed):
    """d up to 40 and seqlen up to 70 cross the kernel's 32-channel and 64-step tiles. x is a contiguous (b, d, l),
    or the first half of an in_proj output computed as (b, l, 2d), or as W · hiddenᵀ, (2d, b·l), as the Mamba block
    computes it. The output has time contiguous, in the last case in x's own layout (the scan reads it in place)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    x = {"contiguous": lambda: rand(batch, d, seqlen),
         "(b, l, 2d)": lambda: rand(batch, seqlen, 2 * d).transpose(1, 2)[:, :d],
         "(2d, b·l)": lambda: rand(2 * d, batch * seqlen)[:d].view(d, batch, seqlen).transpose(0, 1)}[layout]()
    weight, b = rand(d, d_conv), (rand(d) if bias else None)
    dout = rand(batch, d, seqlen)
    inputs = [t.detach().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    expected = reference(inputs[0], inputs[1], inputs[2] if bias else None)
    grads_expected = torch.autograd.grad(expected, inputs, dout)
    mine = [t.detach().requires_grad_() for t in inputs]
    out = causal_conv1d_silu(mine[0], mine[1], mine[2] if bias else None)
    grads = torch.autograd.grad(out, mine, dout)
    assert out.stride() == (x.stride() if layout == "(2d, b·l)" else out.contiguous().stride())
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_in_bf16_the_kernel_rounds_once_what_it_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 50, generator=g).to(DEVICE)
    weight, bias = torch.randn(24, 4, generator=g).to(DEVICE), torch.randn(24, generator=g).to(DEVICE)
    out = causal_conv1d_silu(x.bfloat16(), weight, bias)             # fp32 parameters, as under autocast
    expected = reference(x.bfloat16().float(), weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2 ** -7, atol=2 ** -7)
