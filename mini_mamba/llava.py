"""The tiny LLaVA: a frozen MambaVision encoder, a projector into the language model's embedding space, and the Mamba
language model of mamba.py reading the image features in place of placeholder tokens.

Paper map (Liu et al. 2023, "Visual Instruction Tuning", section 4.1, Figure 1):
    Z_v = g(X_v)      the vision encoder's last feature map before pooling, read as h·w image tokens (vision.py)
    H_v = W · Z_v     the projector: a linear layer (LLaVA) or Linear-GELU-Linear (LLaVA-1.5; the default here)
    [H_v, H_q]        the image tokens take the places of the <image> placeholders in the text's embeddings
    loss              next-token cross-entropy on the assistant's answer and <eos> only (eq. 2: X_a given X_v, X_q)

Training happens in the stages of section 4.2 (train_llava.py): alignment (only the projector learns), then
instruction tuning (projector and language model learn); the vision encoder stays frozen throughout.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .instruct import IGNORE_INDEX, Example, Tokenizer, prompt
from .mamba import MambaLM


class TinyLLaVA(nn.Module):
    def __init__(self, vision: nn.Module, lm: MambaLM, image_token_id: int, projector: str = "mlp"):
        """vision: a trained MambaVision or ViT (vision.py), frozen here."""
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)                # frozen in every stage
        self.lm = lm
        self.image_token_id = image_token_id
        d_vision, d_model = vision.config.dims[-1], lm.config.d_model
        self.projector = (nn.Linear(d_vision, d_model) if projector == "linear" else
                          nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model)))

    def train(self, mode: bool = True) -> "TinyLLaVA":
        super().train(mode)
        self.vision.eval()                                               # frozen BatchNorm statistics too
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (b, channels, H, W) -> image features Z_v (b, h·w, d_vision), the frozen encoder's map."""
        return rearrange(self.vision.features(images), "b c h w -> b (h w) c")

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings (b, l, d_model) with the projected image features in the <image> places."""
        embeddings = self.lm.embedding(input_ids)                        # (b, l, d_model)
        placeholders = input_ids == self.image_token_id                  # (b, l)
        n_features = 0 if image_features is None else image_features.shape[1]
        per_row = placeholders.sum(dim=1)
        if (per_row != n_features).any():
            raise ValueError(f"each sequence needs as many <image> placeholders as there are image features "
                             f"({n_features}); found {sorted(set(per_row.tolist()))}")
        if image_features is not None:
            projected = self.projector(image_features).to(embeddings.dtype)     # (b, n, d_model)
            embeddings[placeholders] = projected.flatten(0, 1)               # the splice, image after image
        return embeddings

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """Logits (b, l, vocab); with labels (b, l), the mean cross-entropy of predicting each labelled token."""
        logits = self.lm(inputs_embeds=self.embed(input_ids, image_features))
        if labels is None:
            return logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def answer(self, tokenizer: Tokenizer, examples: list[Example], image_features: torch.Tensor | None,
               max_new_tokens: int = 8, batch_size: int = 1024) -> list[str]:
        """Greedy answers to each example's question about its image (image_features (n, h·w, d_vision), or None for
        text only). Prompts of equal length go together, so no sequence is padded; the prompt runs as one parallel
        pass and each answer token as one recurrent step of the language model (O(1) per token)."""
        n_image = 0 if image_features is None else image_features.shape[1]
        by_length = defaultdict(list)
        prompts = [tokenizer.encode(prompt(e, n_image)) for e in examples]
        for i, ids in enumerate(prompts):
            by_length[len(ids)].append(i)
        answers = [""] * len(examples)
        device = next(self.parameters()).device
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start:start + batch_size]
                ids = torch.tensor([prompts[i] for i in rows], device=device)
                features = None if image_features is None else image_features[rows]
                new = self.lm.generate(inputs_embeds=self.embed(ids, features), max_new_tokens=max_new_tokens,
                                       eos_token_id=tokenizer.eos_id)
                for i, tokens in zip(rows, new.tolist()):
                    answers[i] = tokenizer.decode(tokens)
        return answers


def build_batch(tokenizer: Tokenizer, examples: list[Example], n_image_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (b, l) for whole conversations, right-padded (a causal model never sees the padding).
    Labels are IGNORE_INDEX everywhere except on the answer's tokens and the closing <eos>."""
    rows = []
    for e in examples:
        context = tokenizer.encode(prompt(e, n_image_tokens))
        answer = tokenizer.encode(e.answer) + [tokenizer.eos_id]
        rows.append((context + answer, [IGNORE_INDEX] * len(context) + answer))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tokenizer.pad_id] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for _, lab in rows])
    return input_ids, labels


def show_batch(tokenizer: Tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, row: int = 0) -> str:
    """One example as a table — position | token | label — so a reader sees exactly what is trained on."""
    lines = ["position | token     | label"]
    for position, (token, label) in enumerate(zip(input_ids[row].tolist(), labels[row].tolist())):
        shown = "·" if label == IGNORE_INDEX else tokenizer.vocab[label]
        lines.append(f"{position:8d} | {tokenizer.vocab[token]:9s} | {shown}")
    return "\n".join(lines)
