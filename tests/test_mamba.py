"""The Mamba block and language model: shapes, the paper's initialisation, and recurrent decoding that reproduces the
parallel forward pass token for token."""
import math

import pytest
import torch
import torch.nn.functional as F

from mini_mamba.mamba import MambaBlock, MambaConfig, MambaLM

from .conftest import DEVICE, eager_and_compiled

IMPLS = ["ref", "parallel", "triton"]


def tiny(impl="parallel", **changes) -> MambaConfig:
    return MambaConfig(**{**dict(d_model=16, n_layers=2, vocab_size=37, d_state=4, scan_impl=impl), **changes})


def test_block_keeps_shape_and_trains():
    block = MambaBlock(tiny())
    x = torch.randn(3, 11, 16)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_initialisation_follows_the_paper():
    config = tiny(d_model=64)
    block = MambaBlock(config)
    assert torch.equal(-torch.exp(block.ssm.A_log), -torch.arange(1.0, 5.0).repeat(128, 1))       # S4D-Real
    assert torch.equal(block.ssm.D, torch.ones(128))
    dt = F.softplus(block.ssm.dt_proj.bias)
    assert (dt >= config.dt_min * 0.999).all() and (dt <= config.dt_max * 1.001).all()
    bound = config.rank ** -0.5
    assert block.ssm.dt_proj.weight.abs().max() <= bound and config.rank == math.ceil(64 / 16)


def test_lm_ties_the_head_to_the_embedding():
    lm = MambaLM(tiny())
    assert lm.lm_head.weight is lm.embedding.weight
    assert lm(torch.randint(0, 37, (2, 5))).shape == (2, 5, 37)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_by_step_decoding_equals_the_full_forward(impl):
    torch.manual_seed(0)
    lm = MambaLM(tiny(impl)).to(DEVICE)
    ids = torch.randint(0, 37, (2, 9), device=DEVICE)
    with torch.no_grad():
        full = lm(ids)
        states, stepped = lm.empty_state(2, DEVICE), []
        for t in range(ids.shape[1]):
            logits, states = lm.step(ids[:, t], states)
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_prefill_then_step_continues_the_sequence(split):
    """The state returned by a parallel pass over a prefix (shorter than the conv window, as long, longer)
    continues it."""
    torch.manual_seed(1)
    lm = MambaLM(tiny())
    ids = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        full = lm(ids)
        logits, states = lm(ids[:, :split], return_state=True)
        rest = []
        for t in range(split, 8):
            step_logits, states = lm.step(ids[:, t], states)
            rest.append(step_logits)
    torch.testing.assert_close(torch.cat([logits, torch.stack(rest, 1)], 1), full, rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_decoding():
    torch.manual_seed(2)
    lm = MambaLM(tiny())
    prompt = torch.randint(0, 37, (3, 4))
    new = lm.generate(prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):                                    # the slow way: the whole sequence again per token
            ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, ids[:, 4:])


def test_generate_stops_at_eos():
    torch.manual_seed(3)
    lm = MambaLM(tiny())
    prompt = torch.randint(0, 37, (2, 3))
    free = lm.generate(prompt, max_new_tokens=5)
    eos = int(free[0, 1])                                     # make the second token of the first row the end token
    stopped = lm.generate(prompt, max_new_tokens=5, eos_token_id=eos)
    assert (stopped[0, 1:] == eos).all()
    first_eos = [int((row == eos).nonzero()[0]) if (row == eos).any() else len(row) for row in free]
    for row, free_row, k in zip(stopped, free, first_eos):
        assert torch.equal(row[:k + 1], free_row[:k + 1])     # identical up to (and including) the first eos


def test_generate_accepts_embeddings():
    torch.manual_seed(4)
    lm = MambaLM(tiny())
    prompt = torch.randint(0, 37, (2, 4))
    assert torch.equal(lm.generate(prompt, 3), lm.generate(inputs_embeds=lm.embedding(prompt), max_new_tokens=3))


def test_the_kernel_path_computes_what_the_reference_path_does_with_the_same_gradients():
    """scan_impl "triton" (the scan and conv kernels; on a CPU through Triton's interpreter) against "ref" (the loop
    and nn.Conv1d), the same weights: logits and every parameter's gradient, in fp32."""
    torch.manual_seed(0)
    fast = MambaLM(tiny("triton", d_model=24)).to(DEVICE)
    slow = MambaLM(tiny("ref", d_model=24)).to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 37, (2, 70), device=DEVICE)                 # longer than one 64-step conv tile
    grads = []
    for lm in (fast, slow):
        logits = lm(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append((logits.detach(), {name: p.grad for name, p in lm.named_parameters()}))
    (fast_logits, fast_grads), (slow_logits, slow_grads) = grads
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-4)
    for name, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch.compile cannot trace the kernels in Triton's CPU interpreter")
def test_the_compiled_block_computes_what_the_eager_one_does(monkeypatch):
    """torch.compile traces the conv and scan kernels into its graph and lays out the tensors around them its own way:
    the block's output and every gradient still agree with eager to fp32 rounding (TF32 off), per tensor relative to
    its norm."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    block = MambaBlock(MambaConfig(d_model=32, n_layers=1)).to(DEVICE)
    hidden = torch.randn(4, 49, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 49, 32, device=DEVICE)
    eager, compiled = eager_and_compiled(block, hidden, lambda out: (out * weight).sum())
    for name in eager:
        assert (compiled[name] - eager[name]).norm() <= 1e-4 * eager[name].norm() + 1e-7, name
