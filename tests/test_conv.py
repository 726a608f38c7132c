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
       bias=st.booleans(), as_in_proj=st.booleans(), seed=st.integers(0, 999))
def test_the_kernel_is_the_causal_conv_and_silu_with_its_gradients(batch, d, seqlen, d_conv, bias, as_in_proj, seed):
    """d up to 40 and seqlen up to 70 cross the kernel's 32-channel and 64-step tiles; as_in_proj reads x as a
    (b, d, l) view of a (b, l, 2d) tensor, as the Mamba block's in_proj output lies, instead of a contiguous x."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    x = rand(batch, seqlen, 2 * d).transpose(1, 2)[:, :d] if as_in_proj else rand(batch, d, seqlen)
    weight, b = rand(d, d_conv), (rand(d) if bias else None)
    dout = rand(batch, d, seqlen)
    inputs = [t.detach().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    expected = reference(inputs[0], inputs[1], inputs[2] if bias else None)
    grads_expected = torch.autograd.grad(expected, inputs, dout)
    mine = [t.detach().requires_grad_() for t in inputs]
    out = causal_conv1d_silu(mine[0], mine[1], mine[2] if bias else None)
    grads = torch.autograd.grad(out, mine, dout)
    assert out.is_contiguous() and out.dtype == x.dtype
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
