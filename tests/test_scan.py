"""The selective scan: three implementations, one specification (scan_ref.py).

Properties (hypothesis): the parallel scan and the Triton kernel give the reference's outputs, last state and gradients
w.r.t. every input, over generated sizes and every combination of optional arguments. The Triton kernel runs here on
the GPU when there is one, otherwise in Triton's CPU interpreter (same kernel code, tiny shapes, small tiles so that a
sequence spans several chunks and segments).

Tolerances. In fp32 the implementations differ only in the order of fp32 sums (and exp2 vs exp): observed errors are
~1e-6 of the tensor's scale; 1e-4 leaves room for longer reductions without hiding a wrong term (a wrong term is O(1)).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_mamba.scan import choose_impl, selective_scan
from mini_mamba.scan_parallel import linear_scan, selective_scan_parallel
from mini_mamba.scan_ref import selective_scan_ref
from mini_mamba.scan_triton import SHORT_TILE, selective_scan_triton, tile_config

from .conftest import DEVICE
from .problems import FP32_TOL, assert_close, assert_same_results, make_problem, problems, run, tolerance

ON_GPU = DEVICE.type == "cuda"
TRITON_EXAMPLES = 40                            # ~1 s per example: the interpreter, or compiling


def to_device(problem: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in problem.items()}


tile_configs = st.fixed_dictionaries(dict(
    block_t=st.sampled_from([8, 16]), block_c=st.sampled_from([1, 2, 4]), bwd_block_c=st.sampled_from([1, 2, 4]),
    num_warps=st.just(1), bwd_num_warps=st.just(1), n_segments=st.integers(1, 3),
    summary_elements=st.sampled_from([32, 64, 256]), summary_num_warps=st.just(1)))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_parallel_scan_matches_reference(problem):
    assert_same_results(run(selective_scan_parallel, problem), run(selective_scan_ref, problem), FP32_TOL)


@settings(max_examples=TRITON_EXAMPLES, deadline=None)
@given(problems(), tile_configs)
def test_triton_kernel_matches_reference(problem, config):
    problem = to_device(problem)
    assert_same_results(run(selective_scan_triton, problem, config=config), run(selective_scan_ref, problem),
                        FP32_TOL)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 70), st.integers(0, 1000))
def test_linear_scan_is_the_recurrence(length, seed):
    """The odd/even recursion gives every prefix h_t = a_t h_{t-1} + b_t."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(3, length, generator=g), torch.randn(3, length, generator=g)
    h, expected = torch.zeros(3), []
    for t in range(length):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    assert_close(linear_scan(a, b), torch.stack(expected, -1), 1e-5)


@pytest.mark.parametrize("impl", [selective_scan_ref, selective_scan_parallel])
@pytest.mark.parametrize("per_step", [True, False])
def test_gradcheck_float64(impl, per_step):
    """Autograd through the reference (and the parallel scan) is the true derivative: finite differences in float64."""
    problem = make_problem(2, 3, 2, 5, seed=3, B_per_step=per_step, C_per_step=not per_step, dtype=torch.float64)
    problem = {k: (v.double().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    names = [k for k, v in problem.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        y, last = impl(**{**problem, **dict(zip(names, tensors))}, return_last_state=True)
        return y, last

    assert torch.autograd.gradcheck(f, [problem[k] for k in names])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_matches_reference(dtype):
    """bf16/fp16 inputs: both sides compute in fp32 from the same inputs and round the results to `dtype`, so they
    may differ by one unit in the last place of the output (eps·|x|, eps = 2^-7 for bf16, 2^-10 for fp16) plus fp32
    summation-order noise: tolerance 2·eps."""
    problem = to_device(make_problem(2, 6, 5, 45, seed=7, dtype=dtype))
    config = dict(block_t=16, block_c=2, bwd_block_c=4, num_warps=1, bwd_num_warps=1, n_segments=2,
                  summary_elements=64, summary_num_warps=1)
    assert_same_results(run(selective_scan_triton, problem, config=config), run(selective_scan_ref, problem),
                        tolerance(dtype))


@pytest.mark.parametrize("seqlen", [1, 16, 49, 127])
def test_triton_default_tiles_on_short_sequences(seqlen):
    """A sequence shorter than one 128-step chunk (MambaVision's 7×7 and 4×4 token maps) gets one chunk of the next
    power of two, at least 16 steps, and more channels per program; the default tiles give the reference's results,
    here with a channel count (20) that leaves part of the last channel block empty."""
    config = tile_config(2, 20, seqlen, DEVICE)
    assert config["block_t"] == max(16, 1 << (seqlen - 1).bit_length())
    assert config["block_c"] == config["bwd_block_c"] == max(4, SHORT_TILE // config["block_t"])
    problem = to_device(make_problem(2, 20, 8, seqlen, seed=seqlen))
    assert_same_results(run(selective_scan_triton, problem), run(selective_scan_ref, problem), FP32_TOL)


@pytest.mark.skipif(not ON_GPU, reason="seqlen 16K at a real width is beyond the CPU interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_long_sequence_on_gpu(dtype, record_property):
    """seqlen 16K, the default tiles. Output and last state against the reference loop; gradients against the
    parallel scan (equal to the reference by the properties above; the loop's autograd over 16K steps is slow).
    Tolerance 2·eps of the dtype (see the low-precision test), 1e-4 in fp32."""
    problem = to_device(make_problem(2, 96, 16, 16384, seed=11, dtype=dtype))
    tol = tolerance(dtype)
    y, last, grads = run(selective_scan_triton, problem)
    y_ref, last_ref = selective_scan_ref(**problem, return_last_state=True)
    for name, actual, expected in [("y", y, y_ref), ("last_state", last, last_ref)]:
        err = (actual.float() - expected.float()).abs().max().item()
        record_property(f"{name}_max_abs_err", err)
        print(f"\n{dtype} seqlen 16384 {name}: max abs err {err:.3e}, max rel err (to max|ref|) "
              f"{err / expected.float().abs().max().item():.3e}")
        assert_close(actual, expected, tol, name)
    _, _, grads_par = run(selective_scan_parallel, problem)
    for name in grads:
        assert_close(grads[name], grads_par[name], tol, f"d{name}")


@pytest.mark.parametrize("used", ["output", "last state"])
@pytest.mark.parametrize("segments", [1, 2])
def test_triton_gradients_when_only_one_result_is_used(used, segments):
    """A model uses y and drops the last state (training), or the reverse: the unused result's gradient is absent, not
    zeros, and the kernel starts from zero itself. Gradients of every input against the reference loop."""
    problem = to_device(make_problem(2, 5, 4, 37, seed=3, initial_state=used == "last state"))   # training: none
    grads = []
    for scan, kwargs in ((selective_scan_triton, dict(config=dict(block_t=16, n_segments=segments))),
                         (selective_scan_ref, {})):
        inputs = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
                  for k, v in problem.items()}
        y, last = scan(**inputs, return_last_state=True, **kwargs)
        weight = torch.randn((y if used == "output" else last).shape, generator=torch.Generator().manual_seed(2))
        loss = ((y if used == "output" else last).float() * weight.to(y.device)).sum()
        leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    scale = max(g.abs().max().item() for g in grads[1])
    for actual, expected in zip(*grads):
        assert_close(actual, expected, FP32_TOL, used, scale)


def test_triton_never_keeps_per_state_sequences():
    """Memory: the kernel saves d_state/BLOCK_T floats per input element for the backward, never the
    (batch, d_inner, seqlen, d_state) states (which here would be 16× the size of u)."""
    problem = to_device(make_problem(1, 4, 16, 64, seed=0))
    inputs = {k: (v.requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan_triton(**inputs, config=dict(block_t=16))
    per_state_size = 1 * 4 * 64 * 16
    assert max(saved) < per_state_size
    assert sum(saved) < 3 * per_state_size


def test_non_contiguous_inputs_work():
    problem = make_problem(2, 3, 4, 9, seed=5)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if isinstance(v, torch.Tensor) and v.dim() >= 2
                   else v) for k, v in problem.items()}
    assert not strided["u"].is_contiguous() and not strided["A"].is_contiguous()
    expected = selective_scan_ref(**problem)
    for impl in ("ref", "parallel", "triton"):
        assert_close(selective_scan(**to_device(strided), impl=impl).cpu(), expected, FP32_TOL, impl)


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """t (b, rows, l) as a view of a (rows, b·l) tensor — the layout of a projection computed as W · inputᵀ, which
    the Mamba block hands to the scan: time contiguous, rows b·l apart."""
    rows = t.permute(1, 0, 2).reshape(t.shape[1], -1).clone()
    return rows.view(t.shape[1], t.shape[0], t.shape[2]).permute(1, 0, 2)


@pytest.mark.parametrize("segments", [1, 2])
def test_triton_reads_channel_major_views_in_place_and_writes_in_their_layout(segments):
    """u, Δ, z and per-step B, C as channel-major views: the kernel reads them where they lie (no copy), y and the
    gradients of u, Δ, z come back in their layout, and every result matches the reference loop."""
    problem = to_device(make_problem(2, 5, 4, 37, seed=4))
    laid_out = {k: channel_major(v) if k in ("u", "delta", "z", "B", "C") else v for k, v in problem.items()}
    assert laid_out["u"].stride() == (37, 74, 1)
    y, last, grads = run(selective_scan_triton, laid_out, config=dict(block_t=16, n_segments=segments))
    assert y.stride() == laid_out["u"].stride()
    assert all(grads[k].stride() == laid_out["u"].stride() for k in ("u", "delta", "z"))
    assert_same_results((y, last, grads), run(selective_scan_ref, problem), FP32_TOL)


def test_auto_picks_an_implementation():
    small = make_problem(1, 4, 4, 8)
    large = make_problem(4, 256, 16, 8)
    assert choose_impl("auto", small["u"], small["A"]) == "parallel"
    assert choose_impl("auto", large["u"], large["A"]) == "ref"
    if ON_GPU:
        assert choose_impl("auto", small["u"].cuda(), small["A"].cuda()) == "triton"
    assert_close(selective_scan(**small), selective_scan_ref(**small), FP32_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error that names the argument


def bad(**changes):
    problem = make_problem(2, 3, 4, 5, seed=0)
    problem.update(changes)
    return problem


@pytest.mark.parametrize("changes, error, words", [
    (dict(u=torch.randn(3, 5)), ValueError, "u must be 3-D"),
    (dict(delta=torch.randn(2, 3, 6)), ValueError, "delta must have shape (2, 3, 5)"),
    (dict(A=torch.randn(4, 4)), ValueError, "A must be 2-D (d_inner=3"),
    (dict(A=torch.randn(3)), ValueError, "A must be 2-D"),
    (dict(B=torch.randn(2, 4, 6)), ValueError, "B must have shape (2, 4, 5) or (3, 4)"),
    (dict(C=torch.randn(2, 5, 5)), ValueError, "C must have shape"),
    (dict(D=torch.randn(4)), ValueError, "D must have shape (3,)"),
    (dict(z=torch.randn(1, 3, 5)), ValueError, "z must have shape"),
    (dict(delta_bias=torch.randn(3, 1)), ValueError, "delta_bias must have shape (3,)"),
    (dict(initial_state=torch.randn(2, 3, 5)), ValueError, "initial_state must have shape (2, 3, 4)"),
    (dict(u=torch.randn(2, 3, 0), delta=torch.randn(2, 3, 0)), ValueError, "at least one time step"),
    (dict(u=torch.ones(2, 3, 5, dtype=torch.int64)), TypeError, "u must be float32"),
    (dict(B=torch.ones(2, 4, 5, dtype=torch.int32)), TypeError, "B must be float32"),
    (dict(A=torch.randn(3, 4, dtype=torch.complex64)), TypeError, "A must be real"),
    (dict(u=[[1.0]]), TypeError, "u must be a torch.Tensor"),
    (dict(D=torch.randn(3, device="meta")), ValueError, "D is on meta but u is on cpu"),
])
def test_bad_input_is_named(changes, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        selective_scan(**bad(**changes))


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(**bad(), impl="cuda")


def test_triton_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
        selective_scan(**bad(), impl="triton")


def test_triton_refuses_float64():
    problem = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in bad().items()}
    with pytest.raises(TypeError, match="impl='triton' takes float32, float16 or bfloat16"):
        selective_scan(**to_device(problem), impl="triton")
