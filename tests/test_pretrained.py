"""MambaLM.from_pretrained against golden numbers from an independent implementation (transformers' MambaForCausalLM,
tests/fixtures/tiny_mamba/make.py): a tiny random Mamba in both checkpoint layouts gives the same logits and greedy
tokens through every scan; and every checkpoint MambaLM cannot represent is a one-line error naming why."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from mini_mamba import MambaLM
from mini_mamba.pretrained import CheckpointError

from .conftest import DEVICE

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_mamba"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
IDS = torch.tensor(GOLDEN["input_ids"])


@pytest.mark.parametrize("layout", ["hf", "state-spaces"])
@pytest.mark.parametrize("impl", ["ref", "parallel", "triton"])            # triton: the interpreter on a CPU
def test_both_layouts_give_the_golden_logits_and_greedy_tokens(layout, impl):
    lm = MambaLM.from_pretrained(FIXTURE / layout, scan_impl=impl).to(DEVICE)
    assert lm.config.vocab_size == 104                                 # state-spaces: 100 padded to a multiple of 8
    with torch.no_grad():
        logits = lm(IDS.to(DEVICE))
    torch.testing.assert_close(logits.cpu(), torch.tensor(GOLDEN["logits"]), rtol=1e-5, atol=1e-5)
    assert lm.generate(IDS.to(DEVICE), max_new_tokens=8).tolist() == GOLDEN["greedy_tokens"]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 through the Triton kernels needs a CUDA GPU")
def test_in_bf16_on_the_gpu_the_kernels_give_the_golden_logits_within_bf16_rounding():
    lm = MambaLM.from_pretrained(FIXTURE / "hf").to("cuda", torch.bfloat16)
    with torch.no_grad():
        logits = lm(IDS.cuda()).float().cpu()
    want = torch.tensor(GOLDEN["logits"])
    assert (logits - want).abs().max() <= 2e-2 * want.abs().max()     # a few bf16 roundings of each activation


def copy_of(tmp_path: Path, layout: str, config_changes: dict | None = None, weights=None) -> Path:
    """The fixture's layout copied, its config.json changed, and weights(state) applied to its tensors."""
    folder = tmp_path / layout
    shutil.copytree(FIXTURE / layout, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if weights is not None:
        path = folder / "pytorch_model.bin"
        state = torch.load(path, weights_only=True)
        weights(state)
        torch.save(state, path)
    return folder


def edited(**changes):
    def edit(state):
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value(state)
    return edit


@pytest.mark.parametrize("layout, config, weights, message", [
    ("hf", dict(use_bias=True), None, "its projections have biases"),
    ("hf", dict(use_conv_bias=False), None, "its conv1d has no bias"),
    ("hf", dict(model_type="mamba2"), None, "model_type 'mamba2' is not a Mamba-1 language model"),
    ("hf", dict(tie_word_embeddings=False), None, "its output head is not tied to the embedding"),
    ("state-spaces", dict(rms_norm=False), None, "it uses LayerNorm"),
    ("state-spaces", dict(attn_layer_idx=[1]), None, "it has attention layers"),
    ("state-spaces", dict(d_intermediate=256), None, "it has MLP layers"),
    ("state-spaces", dict(ssm_cfg=dict(layer="Mamba2")), None, "Mamba2 layers are not Mamba-1 blocks"),
    ("state-spaces", None, edited(**{"lm_head.weight": lambda s: s["lm_head.weight"] + 1}),
     "lm_head.weight differs from the embedding"),
    ("state-spaces", None, edited(**{"backbone.layers.0.mixer.extra": lambda s: torch.zeros(3)}),
     "MambaLM has no place for layers.0.mixer.extra"),
    ("state-spaces", None, edited(**{"backbone.layers.1.mixer.D": None}), "no tensor for layers.1.mixer.ssm.D"),
    ("state-spaces", None, edited(**{"backbone.layers.1.mixer.D": lambda s: torch.zeros(7)}),
     "layers.1.mixer.ssm.D has shape (7,), MambaLM's (128,)"),
    ("state-spaces", None, edited(**{"backbone.norm_f.bias": lambda s: torch.zeros(64)}), "it uses LayerNorm"),
])
def test_what_mambalm_cannot_represent_is_refused_by_name(tmp_path, layout, config, weights, message):
    folder = copy_of(tmp_path, layout, config, weights)
    with pytest.raises(CheckpointError) as refused:
        MambaLM.from_pretrained(folder)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("layout, file, message", [
    ("hf", "model.safetensors", "is truncated"),
    ("state-spaces", "pytorch_model.bin", "could not be read (")])
def test_a_truncated_weights_file_is_a_clear_error(tmp_path, layout, file, message):
    folder = copy_of(tmp_path, layout)
    (folder / file).write_bytes((folder / file).read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="truncated") as refused:
        MambaLM.from_pretrained(folder)
    assert message in str(refused.value)


def test_a_folder_without_weights_or_config_and_a_missing_name_are_clear_errors(tmp_path):
    folder = copy_of(tmp_path, "hf")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors or pytorch_model.bin"):
        MambaLM.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        MambaLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="is not a folder here"):      # offline, or huggingface_hub absent
        MambaLM.from_pretrained(tmp_path / "no such model")
