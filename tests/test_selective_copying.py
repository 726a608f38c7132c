"""Selective copying (selective_copying.py): the task as the paper states it, a time-invariant SSM that is time
invariant, and the gap that selection makes — trained for real on a CPU at a tiny size."""
import torch
from hypothesis import given, settings, strategies as st

from mini_mamba.selective_copying import MARKER, NOISE, TimeInvariantSSM, copying_batch, copying_model, train_copying

TINY = dict(seqlen=32, n_data=4, vocab=8, d_model=32, n_layers=2, batch=32, lr=3e-3, steps=500, eval_every=500)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(3, 20), st.integers(0, 2 ** 31))
def test_a_batch_hides_the_data_tokens_in_noise_and_asks_for_them_in_order(seqlen, n_data, vocab, seed):
    n_data = min(n_data, seqlen)
    tokens, data = copying_batch(8, seqlen, n_data, vocab, torch.Generator().manual_seed(seed))
    assert tokens.shape == (8, seqlen + n_data) and data.shape == (8, n_data)
    assert (tokens[:, seqlen:] == MARKER).all() and ((data >= 2) & (data < vocab)).all()
    for row, expected in zip(tokens[:, :seqlen], data):
        assert row[row != NOISE].tolist() == expected.tolist()          # the data tokens, in order, amid noise


def test_the_data_tokens_sit_at_new_positions_in_every_sequence():
    tokens, _ = copying_batch(64, 32, 4, 8, torch.Generator().manual_seed(0))
    assert len({tuple((row != NOISE).nonzero().flatten().tolist()) for row in tokens[:, :32]}) == 64


def test_the_two_models_differ_only_in_the_ssm():
    torch.manual_seed(0)
    selective, invariant = copying_model(True, 32, 2, 8), copying_model(False, 32, 2, 8)
    shapes = lambda m: {k: v.shape for k, v in m.named_parameters() if ".ssm." not in k}
    assert shapes(selective) == shapes(invariant)
    assert all(isinstance(layer.mixer.ssm, TimeInvariantSSM) for layer in invariant.layers)
    assert not any("x_proj" in k or "dt_proj.weight" in k for k, _ in invariant.named_parameters())


def test_the_time_invariant_ssm_is_linear_and_time_invariant_and_the_selective_one_is_not_linear():
    torch.manual_seed(0)
    selective = copying_model(True, 16, 1, 8).layers[0].mixer.ssm
    invariant = TimeInvariantSSM(selective)
    x1, x2 = torch.randn(2, 32, 12), torch.randn(2, 32, 12)
    later = lambda t: torch.cat([torch.zeros(2, 32, 3), t[..., :-3]], dim=-1)    # three steps later, zeros before
    with torch.no_grad():
        torch.testing.assert_close(invariant(x1 + 2 * x2), invariant(x1) + 2 * invariant(x2))     # a convolution:
        torch.testing.assert_close(invariant(later(x1))[..., 3:], invariant(x1)[..., :-3])         # linear, LTI
        assert not torch.allclose(selective(x1 + 2 * x2), selective(x1) + 2 * selective(x2), atol=1e-3)


def test_selection_learns_the_task_and_a_time_invariant_scan_does_not():
    torch.manual_seed(0)
    selective = train_copying(True, **TINY)[-1]["accuracy"]
    invariant = train_copying(False, **TINY)[-1]["accuracy"]
    assert selective >= 0.7 and selective - invariant >= 0.25, (selective, invariant)
