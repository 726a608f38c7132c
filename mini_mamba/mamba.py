"""The Mamba block, the residual block around it, and a Mamba language model with O(1)-per-token decoding.

Gu & Dao 2023, section 3.4 (Figure 3, "Mamba" block) and Algorithm 2; initialisation from section 3.6 and appendix;
the language model as in section 4.2 (embedding, N residual Mamba blocks with RMSNorm, tied output head).

Glossary (code -> paper):
    b, l, d_model         batch, sequence length L, model width D
    d_inner = expand·d_model   the block's inner width E·D (E = 2)
    d_state               N, the SSM state size per channel (16)
    dt_rank               R, the rank of the Δ projection (⌈D/16⌉)
    in_proj               the two input projections of Figure 3, fused: x (SSM branch) and z (gate branch)
    conv1d                the short causal depthwise convolution before the SSM (width d_conv = 4)
    ssm                   SelectiveSSM: x_proj, dt_proj, A_log, D around the scan
    x_proj, dt_proj       s_B(x), s_C(x), s_Δ(x) of Algorithm 2: Δ = softplus(dt_proj(x_proj(x)) ) + selection of B, C
    A_log, D              A = -exp(A_log) (kept negative: a decaying, stable state), and the skip D
    conv_state, ssm_state what decoding carries between tokens: the last d_conv-1 conv inputs and h
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .scan import choose_impl, selective_scan


@dataclass
class MambaConfig:
    d_model: int = 768
    n_layers: int = 24
    vocab_size: int = 50280
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int = 0              # 0: ⌈d_model / 16⌉ as in the paper
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5        # RMSNorm's ε
    scan_impl: str = "auto"       # which selective_scan implementation the blocks use (see scan.py)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)


class SelectiveSSM(nn.Module):
    """The selective SSM of Algorithm 2 around selective_scan: x_proj and dt_proj select Δ, B, C from the input,
    A = -exp(A_log) and D are learned per channel. Shared by the Mamba block below and MambaVision's mixer."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, scan_impl: str = "auto"):
        super().__init__()
        self.d_state, self.dt_rank, self.scan_impl = d_state, dt_rank, scan_impl
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation (section 3.6): A = -(1, 2, ..., N) per channel (S4D-Real), D = 1,
        Δ's bias = softplus⁻¹(Δ₀) with Δ₀ log-uniform in [dt_min, dt_max], dt_proj's weights ~ U(±dt_rank^-0.5)."""
        d_inner = self.D.shape[0]
        dt_min, dt_max, dt_init_floor = self.dt_range
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))         # softplus⁻¹(dt)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selection mechanism (Algorithm 2, lines 2-4): Δ (before softplus and bias), B and C from x.
        x: (b, d_inner, l) -> delta (b, d_inner, l), B (b, d_state, l), C (b, d_state, l).
        Channel-major, W · x over all b·l tokens: the results are views with time contiguous, which the scan reads in
        place; x is read in place too when it is channel-major (the Mamba block's), else copied once."""
        b = x.shape[0]
        x_dbl = self.x_proj.weight @ rearrange(x, "b d l -> d (b l)")         # (rank + 2·d_state, b·l)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=0)
        delta = self.dt_proj.weight @ dt                                       # (d_inner, b·l); bias: in the scan
        return tuple(rearrange(t, "e (b l) -> b e l", b=b) for t in (delta, B, C))

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Whether inputs like x (b, d_inner, ...) go to the Triton kernels (scan.py's choose_impl decides)."""
        return choose_impl(self.scan_impl, x.reshape(x.shape[0], x.shape[1], -1), self.A_log) == "triton"

    def step(self, x: torch.Tensor, z: torch.Tensor | None, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token (section 3.3, the recurrent mode): x, z (b, d_inner) -> y (b, d_inner); ssm_state
        (b, d_inner, d_state) is advanced in place. One fused kernel on the Triton path, the reference loop else."""
        if not self.uses_kernels(x):
            y, h = self(x[..., None], None if z is None else z[..., None], ssm_state, return_last_state=True)
            ssm_state.copy_(h)
            return y[..., 0]
        from .step_triton import ssm_step                                    # Triton loads on first use
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)   # (b, ·)
        return ssm_step(ssm_state, x, dt, self.A_log, B, C, self.D, z, self.dt_proj.bias, delta_softplus=True,
                        dt_weight=self.dt_proj.weight)                       # Δ = dt · W_dtᵀ inside the kernel

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, ssm_state: torch.Tensor | None = None,
                return_last_state: bool = False):
        """The selective scan of x (b, d_inner, l), gated by silu(z) when given, from ssm_state (b, d_inner, d_state)."""
        delta, B, C = self.ssm_inputs(x)
        A = -torch.exp(self.A_log.float())                                   # (d_inner, d_state)
        impl = self.scan_impl if x.shape[-1] > 1 else "ref"                  # one step: no kernel launch needed
        return selective_scan(x, delta, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                             delta_softplus=True, initial_state=ssm_state, return_last_state=return_last_state,
                             impl=impl)


class MambaBlock(nn.Module):
    """in_proj -> causal depthwise conv1d -> SiLU -> selective SSM gated by z -> out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = c = config
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=False)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.d_conv, groups=c.d_inner, padding=c.d_conv - 1)
        self.ssm = SelectiveSSM(c.d_inner, c.d_state, c.rank, c.dt_min, c.dt_max, c.dt_init_floor, c.scan_impl)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """silu(causal depthwise conv1d) of x (b, d_inner, l). On the Triton path one kernel reads x where in_proj
        left it, as (b, l, d_inner) (conv_triton.py); else nn.Conv1d, whose padding is dropped on the right."""
        if self.ssm.uses_kernels(x):
            from .conv_triton import causal_conv1d_silu                     # Triton loads on first use
            return causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
        return F.silu(self.conv1d(x)[..., :x.shape[-1]])

    def forward(self, hidden: torch.Tensor, return_state: bool = False):
        """hidden: (b, l, d_model) -> (b, l, d_model); with return_state also (conv_state, ssm_state) after the
        last token, to continue with step().
        Layout: in_proj is computed channel-major, W · hiddenᵀ, so x and z are (b, d_inner, l) views with time
        contiguous, which the conv and scan kernels read in place and whose layout their outputs keep; out_proj
        takes y as a transposed operand. No layout copies between the matrix products and the kernels."""
        b = hidden.shape[0]
        xz = self.in_proj.weight @ rearrange(hidden, "b l d -> d (b l)")     # (2·d_inner, b·l)
        x, z = (rearrange(t, "e (b l) -> b e l", b=b) for t in xz.chunk(2, dim=0))   # (b, d_inner, l) each
        x_conv = self.conv(x)
        y, ssm_state = self.ssm(x_conv, z, return_last_state=True) if return_state else (self.ssm(x_conv, z), None)
        out = self.out_proj(rearrange(y, "b e l -> (b l) e")).view(hidden.shape)   # y read where it lies
        if not return_state:
            return out
        return out, (self.conv_window(x), ssm_state)

    def conv_window(self, x: torch.Tensor) -> torch.Tensor:
        """The conv state after x (b, d_inner, l): its last d_conv-1 inputs, zeros before the first when l is
        shorter. Only those steps are copied (padding all of x first would copy the whole sequence)."""
        k = self.config.d_conv - 1
        return F.pad(x[..., -k:], (max(0, k - x.shape[-1]), 0)).contiguous()   # (b, d_inner, d_conv-1)

    def empty_state(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return (torch.zeros(batch, c.d_inner, c.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=torch.float32))

    def step(self, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token: hidden (b, d_model) and the carried (conv_state, ssm_state) -> (b, d_model) and the state,
        advanced in place. Constant time and memory per token — the recurrent mode of section 3.3."""
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                         # (b, d_inner) each
        weight = self.conv1d.weight[:, 0]                                    # (d_inner, d_conv)
        if self.ssm.uses_kernels(x):
            from .step_triton import conv_step
            x_conv = conv_step(x, conv_state, weight, self.conv1d.bias)
        else:
            window = torch.cat([conv_state, x[..., None]], dim=-1)          # (b, d_inner, d_conv)
            x_conv = F.silu((window * weight).sum(-1) + self.conv1d.bias)
            conv_state.copy_(window[..., 1:])
        y = self.ssm.step(x_conv, z, ssm_state)
        return self.out_proj(y), (conv_state, ssm_state)


def add_norm(norm: nn.RMSNorm, x: torch.Tensor, y: torch.Tensor | None, use_kernel: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)), x when y is None; one Triton kernel when use_kernel."""
    if use_kernel:
        from .step_triton import add_rms_norm                                # Triton loads on first use
        return add_rms_norm(x, y, norm.weight, norm.eps)
    x = x if y is None else x + y
    return x, norm(x)


class ResidualBlock(nn.Module):
    """x + Mamba(RMSNorm(x)): the pre-norm residual block of the language model."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaBlock(config)

    def forward(self, x: torch.Tensor, return_state: bool = False):
        if not return_state:
            return x + self.mixer(self.norm(x))
        y, state = self.mixer(self.norm(x), return_state=True)
        return x + y, state


class MambaLM(nn.Module):
    """Embedding -> n_layers residual Mamba blocks -> RMSNorm -> output head tied to the embedding."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(ResidualBlock(config) for _ in range(config.n_layers))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight                         # tied
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():                                                # GPT-2's rescaling of residual outputs
            for layer in self.layers:
                layer.mixer.out_proj.weight /= math.sqrt(config.n_layers)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_state: bool = False):
        """Token ids (b, l) — or embeddings (b, l, d_model), as LLaVA passes them — -> logits (b, l, vocab);
        with return_state also the per-layer states after the last token (to continue with step())."""
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        states = []
        for layer in self.layers:
            if return_state:
                x, state = layer(x, return_state=True)
                states.append(state)
            else:
                x = layer(x)
        logits = self.lm_head(self.norm_f(x))
        return (logits, states) if return_state else logits

    @classmethod
    def from_pretrained(cls, name_or_path: str, scan_impl: str = "auto") -> "MambaLM":
        """A Mamba-1 language model's weights — a local folder in the state-spaces or Hugging Face layout, or a hub
        name such as "state-spaces/mamba-130m" (downloaded with huggingface_hub when installed) — as a MambaLM in
        float32 on the CPU. pretrained.py maps the names and refuses what MambaLM cannot represent."""
        from .pretrained import from_pretrained
        return from_pretrained(name_or_path, scan_impl)

    def empty_state(self, batch: int, device=None, dtype=None) -> list:
        return [layer.mixer.empty_state(batch, device, dtype) for layer in self.layers]

    def step(self, token: torch.Tensor, states: list):
        """One token per sequence, token (b,) -> logits (b, vocab) and the states, advanced in place: O(1) time and
        memory. Each block's residual add is taken with the next block's norm (add_norm): one kernel on the
        Triton path."""
        x, y = self.embedding(token), None             # the residual stream; the last block's output, to add to it
        kernels = self.layers[0].mixer.ssm.uses_kernels(x)
        for layer, state in zip(self.layers, states):
            x, h = add_norm(layer.norm, x, y, kernels)                        # (b, d_model) each
            y, _ = layer.mixer.step(h, state)
        _, h = add_norm(self.norm_f, x, y, kernels)
        return self.lm_head(h), states

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, max_new_tokens: int = 32,
                 inputs_embeds: torch.Tensor | None = None, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: the prompt (ids (b, l) or embeddings (b, l, d_model)) in one parallel pass, then one
        recurrent step per new token. Returns the new tokens (b, ≤ max_new_tokens); after eos, eos repeats."""
        logits, states = self(input_ids, inputs_embeds, return_state=True)
        token = logits[:, -1].argmax(-1)                                     # (b,)
        out = [token]
        finished = token == eos_token_id if eos_token_id is not None else None
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            logits, states = self.step(token, states)
            token = logits.argmax(-1)
            if finished is not None:
                token = torch.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            out.append(token)
        return torch.stack(out, dim=1)
