"""Why the scan is selective: the selective-copying task (Gu & Dao 2023, section 3.1 and 4.1.1, Figure 2), on which a
time-invariant SSM fails and the selective one succeeds.

The task: a sequence of noise tokens with a few data tokens at random positions, then as many marker tokens; after
each marker the model must output the next data token, in order. Where the data tokens sit changes from sequence to
sequence, so a model must decide from the content of each token whether to keep it (Δ large, B open) or ignore it
(Δ ≈ 0): a linear time-invariant system applies the same Δ, B, C to every token, whatever it is, and cannot.

Two models that differ in that alone, both MambaLM on selective_scan: the Mamba block as it is (S6: Δ, B, C computed
from each token by x_proj and dt_proj), and the same block with TimeInvariantSSM in its place (Δ, B, C learned per
channel, as in S4D — the paper's "S4" row of Table 1). Same width, depth, optimizer and steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .mamba import MambaConfig, MambaLM, SelectiveSSM
from .scan import selective_scan

NOISE, MARKER = 0, 1                                    # data tokens are 2 .. vocab-1


def copying_batch(batch: int, seqlen: int, n_data: int, vocab: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (batch, seqlen + n_data): noise with n_data data tokens at random positions of the first seqlen, then
    n_data markers; targets (batch, n_data): the data tokens in order, to be predicted at the markers."""
    data = torch.randint(2, vocab, (batch, n_data), generator=generator)
    positions = torch.rand(batch, seqlen, generator=generator).argsort(-1)[:, :n_data].sort(-1).values
    tokens = torch.full((batch, seqlen + n_data), NOISE, dtype=torch.long)
    tokens.scatter_(1, positions, data)
    tokens[:, seqlen:] = MARKER
    return tokens.to(device), data.to(device)


class TimeInvariantSSM(nn.Module):
    """The SSM of a Mamba block with the selection taken out: Δ = softplus(bias), B and C are parameters, one per
    channel (S4D's B = 1, C ~ N(0, 1)), the same for every token; A and D as in the selective layer it replaces,
    initialised the same way. Only the parallel (training) pass: the task needs no decoding step."""

    def __init__(self, selective: SelectiveSSM):
        super().__init__()
        d_inner, d_state = selective.A_log.shape
        self.scan_impl = selective.scan_impl
        self.A_log, self.D = selective.A_log, selective.D
        self.delta_bias = nn.Parameter(selective.dt_proj.bias.detach().clone())
        self.B = nn.Parameter(torch.ones(d_inner, d_state))
        self.C = nn.Parameter(torch.randn(d_inner, d_state))

    uses_kernels = SelectiveSSM.uses_kernels

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x, z (b, d_inner, l) -> y (b, d_inner, l), with the time-invariant B and C of shape (d_inner, d_state)."""
        return selective_scan(x, torch.zeros_like(x), -torch.exp(self.A_log.float()), self.B, self.C, self.D.float(), z,
                              delta_bias=self.delta_bias.float(), delta_softplus=True, impl=self.scan_impl)


def copying_model(selective: bool, d_model: int, n_layers: int, vocab: int, scan_impl: str = "auto") -> MambaLM:
    """A MambaLM for the task; selective=False swaps every block's SSM for TimeInvariantSSM."""
    lm = MambaLM(MambaConfig(d_model=d_model, n_layers=n_layers, vocab_size=vocab, scan_impl=scan_impl))
    if not selective:
        for layer in lm.layers:
            layer.mixer.ssm = TimeInvariantSSM(layer.mixer.ssm)
    return lm


def train_copying(selective: bool, steps: int = 10_000, seqlen: int = 256, n_data: int = 16, vocab: int = 16,
                  d_model: int = 128, n_layers: int = 2, batch: int = 128, lr: float = 1e-3, seed: int = 0,
                  device: torch.device | str = "cpu", eval_every: int = 500, scan_impl: str = "auto",
                  desc: str | None = None) -> list[dict]:
    """Train one model on fresh batches (AdamW, linear warmup then a constant rate, bf16 autocast on a GPU); returns
    the token accuracy on 1,024 held-out sequences every eval_every steps and at the end: [{step, accuracy, loss}].
    The defaults are bench.py's GPU setting (docs/selective-copying.md: 99.2% selective, 57.4% time-invariant on an
    H200). desc: a progress bar's title (none without)."""
    torch.manual_seed(seed)
    model = copying_model(selective, d_model, n_layers, vocab, scan_impl).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=torch.device(device).type == "cuda")
    train_rng, test_rng = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(10_000 + seed)
    test = copying_batch(1024, seqlen, n_data, vocab, test_rng, device)
    history = []
    bar = tqdm(range(1, steps + 1), desc=desc, disable=desc is None, dynamic_ncols=True)
    for step in bar:
        tokens, data = copying_batch(batch, seqlen, n_data, vocab, train_rng, device)
        with autocast:
            logits = model(tokens)[:, seqlen:]                            # the predictions at the markers
        loss = F.cross_entropy(logits.float().flatten(0, 1), data.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            history.append(dict(step=step, loss=loss.item(), accuracy=copying_accuracy(model, *test, autocast)))
            bar.set_postfix(accuracy=f"{history[-1]['accuracy']:.3f}")
    return history


@torch.no_grad()
def copying_accuracy(model: MambaLM, tokens: torch.Tensor, data: torch.Tensor, autocast) -> float:
    """The share of data tokens reproduced at their marker."""
    model.eval()
    with autocast:
        predicted = model(tokens)[:, -data.shape[1]:].argmax(-1)
    model.train()
    return (predicted == data).float().mean().item()
