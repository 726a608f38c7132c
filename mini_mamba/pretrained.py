"""Real Mamba-1 language models on MambaLM: checkpoints in the state-spaces layout (the official `mamba_ssm` package's
MambaLMHeadModel) and in the Hugging Face layout (transformers' MambaForCausalLM), from a local folder or the hub.

Both hold exactly MambaLM's tensors, under other names:

    theirs                                                  ours
    backbone.embedding.weight (HF: backbone.embeddings)     embedding.weight
    backbone.layers.i.norm.weight                           layers.i.norm.weight
    backbone.layers.i.mixer.{in_proj, conv1d, out_proj}     layers.i.mixer.{in_proj, conv1d, out_proj}
    backbone.layers.i.mixer.{x_proj, dt_proj, A_log, D}     layers.i.mixer.ssm.{x_proj, dt_proj, A_log, D}
    backbone.norm_f.weight                                  norm_f.weight
    lm_head.weight (absent when tied)                       lm_head.weight, tied to embedding.weight

Loading is strict: a tensor MambaLM has no place for, or a place no tensor fills, is an error naming it, and so is a
configuration MambaLM cannot represent (biased projections, no conv bias, LayerNorm, attention or MLP layers, Mamba-2
layers, an untied head). The vocabulary is padded to a multiple of pad_vocab_size_multiple, as the official code does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .mamba import MambaConfig, MambaLM

SSM_PARAMETERS = ("x_proj", "dt_proj", "A_log", "D")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that MambaLM cannot represent; the message says which and why."""


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise CheckpointError(message)


def config_from(raw: dict, source: str) -> MambaConfig:
    """MambaConfig from either layout's config.json, refusing what MambaLM does not have."""
    hf = "hidden_size" in raw
    _refuse(hf and raw.get("model_type", "mamba") != "mamba",
            f"{source}: model_type {raw.get('model_type')!r} is not a Mamba-1 language model")
    ssm = {} if hf else dict(raw.get("ssm_cfg") or {})
    _refuse(ssm.get("layer", "Mamba1") != "Mamba1", f"{source}: {ssm.get('layer')} layers are not Mamba-1 blocks")
    _refuse(raw.get("use_bias", ssm.get("bias", False)), f"{source}: its projections have biases; MambaLM's do not")
    _refuse(not raw.get("use_conv_bias", ssm.get("conv_bias", True)), f"{source}: its conv1d has no bias")
    _refuse(not raw.get("rms_norm", True), f"{source}: it uses LayerNorm; MambaLM uses RMSNorm")
    _refuse(bool(raw.get("attn_layer_idx")), f"{source}: it has attention layers (attn_layer_idx); MambaLM has none")
    _refuse(raw.get("d_intermediate", 0) > 0, f"{source}: it has MLP layers (d_intermediate); MambaLM has none")
    _refuse(not raw.get("tie_word_embeddings", raw.get("tie_embeddings", True)),
            f"{source}: its output head is not tied to the embedding; MambaLM's is")
    _refuse(raw.get("hidden_act", "silu") != "silu", f"{source}: activation {raw.get('hidden_act')!r}, not silu")
    d_model = raw["hidden_size"] if hf else raw["d_model"]
    vocab, multiple = raw["vocab_size"], raw.get("pad_vocab_size_multiple", 1 if hf else 8)
    rank = raw.get("time_step_rank", ssm.get("dt_rank", "auto"))
    return MambaConfig(d_model=d_model, n_layers=raw["num_hidden_layers"] if hf else raw["n_layer"],
                       vocab_size=multiple * math.ceil(vocab / multiple),
                       d_state=raw.get("state_size", ssm.get("d_state", 16)),
                       expand=raw.get("expand", ssm.get("expand", 2)),
                       d_conv=raw.get("conv_kernel", ssm.get("d_conv", 4)), dt_rank=0 if rank == "auto" else rank,
                       norm_eps=raw.get("layer_norm_epsilon", raw.get("norm_epsilon", 1e-5)))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file: 8 bytes (little-endian header length), a JSON header of name -> dtype, shape and byte
    offsets, then the raw tensors. Read here in a few lines rather than through another package."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file, or it is truncated") from None
    body, tensors = memoryview(raw)[8 + size:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        _refuse(end > len(body), f"{path} is truncated: {name} ends at byte {end} of {len(body)}")
        tensors[name] = torch.frombuffer(bytearray(body[start:end]), dtype=SAFETENSORS_DTYPES[info["dtype"]]
                                         ).reshape(info["shape"])
    return tensors


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors or pytorch_model.bin in folder (or of every shard their index names)."""
    for name, read in (("model.safetensors", read_safetensors),
                       ("pytorch_model.bin", lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        index = folder / f"{name}.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [name]
        if not (folder / files[0]).is_file():
            continue
        state = {}
        for file in files:
            try:
                state.update(read(folder / file))
            except CheckpointError:
                raise
            except Exception as error:                  # torch and pickle raise many types for a bad file
                raise CheckpointError(f"{folder / file} could not be read ({type(error).__name__}): is it "
                                      "truncated, or another file?") from None
        return state
    raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin")


def our_name(key: str) -> str:
    """A checkpoint's tensor name in MambaLM's state_dict (the table above)."""
    parts = key.split(".")
    parts = parts[1:] if parts[0] == "backbone" else parts
    parts[0] = "embedding" if parts[0] == "embeddings" else parts[0]
    if len(parts) > 3 and parts[0] == "layers" and parts[2] == "mixer" and parts[3] in SSM_PARAMETERS:
        parts.insert(3, "ssm")
    return ".".join(parts)


def load_state(model: MambaLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor into its place, strictly: each name must have a place of the same shape, and every place a
    tensor; a head stored beside the embedding must equal it (tied)."""
    ours = {our_name(k): v for k, v in state.items()}
    _refuse(any(k.endswith(("norm.bias", "norm_f.bias")) for k in ours), f"{source}: it uses LayerNorm (norm biases)")
    head = ours.pop("lm_head.weight", None)
    _refuse(head is not None and "embedding.weight" in ours and not torch.equal(head, ours["embedding.weight"]),
            f"{source}: lm_head.weight differs from the embedding; MambaLM's head is tied")
    places = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    first = lambda keys: keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
    unknown, missing = sorted(set(ours) - set(places)), sorted(set(places) - set(ours))
    if unknown:
        raise CheckpointError(f"{source}: MambaLM has no place for {first(unknown)}")
    if missing:
        raise CheckpointError(f"{source}: no tensor for {first(missing)}")
    for k, v in ours.items():
        _refuse(v.shape != places[k].shape, f"{source}: {k} has shape {tuple(v.shape)}, MambaLM's "
                                            f"{tuple(places[k].shape)}")
    model.load_state_dict({**ours, "lm_head.weight": ours["embedding.weight"]}, strict=True)


def locate(name_or_path: str | Path) -> Path:
    """A local folder, or a hub repository's files downloaded with huggingface_hub when it is installed."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name_or_path} is not a folder here, and huggingface_hub is not installed to "
                              "download it") from None
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as error:                           # offline, no such repository, ...
        raise CheckpointError(f"{name_or_path} is not a folder here and could not be downloaded "
                              f"({type(error).__name__})") from None


def from_pretrained(name_or_path: str | Path, scan_impl: str = "auto") -> MambaLM:
    """MambaLM with a checkpoint's weights, in float32 on the CPU (move and cast it as any module)."""
    folder = locate(name_or_path)
    config_path = folder / "config.json"
    _refuse(not config_path.is_file(), f"{folder} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError:
        raise CheckpointError(f"{config_path} is not valid JSON") from None
    config = config_from(raw, str(folder))
    config.scan_impl = scan_impl
    model = MambaLM(config)
    load_state(model, read_weights(folder), str(folder))
    return model.eval()
