"""What both training scripts share: device and process set-up, the AdamW recipe (parameter groups, warmup + cosine),
an exponential moving average of the weights, checkpoints that survive interruption, and Ctrl-C handling.

Nothing here is specific to a model; train_cifar.py and train_llava.py read top to bottom with these as verbs.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

NO_DECAY = ("A_log", "D", "gamma", "gamma1", "gamma2")      # SSM parameters and layer scales, as the recipes do


def setup(device: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) one NCCL process per GPU; otherwise `device`,
    or CUDA when there is one. Warns that a CPU run is slow."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local), dist.get_rank(), world
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "cpu":
        print("note: running on the CPU — this works, but is slow; use a GPU for real runs", flush=True)
    return device, 0, 1


def fail(message: str, code: int = 2):
    """Stop the script with a one-line error message, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and kernels only — none on norms, biases, A_log, D and layer scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or name.rsplit(".", 1)[-1] in NO_DECAY
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier: linear from 0 over `warmup` steps, then a cosine down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class EMA:
    """An exponential moving average of a model's weights (Polyak averaging), kept as a frozen copy of the model;
    buffers (BatchNorm statistics) are copied. The decay ramps up as (1 + t) / (10 + t) so early steps count."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema, live = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema, live, 1 - decay)
        torch._foreach_copy_(list(self.model.buffers()), list(model.buffers()))


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM set a flag instead of killing the process mid-step; the training loop checks it
    between steps, saves a checkpoint and exits. A second Ctrl-C stops at once. Use as a context manager: the
    previous handlers come back on leaving it, however it is left."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def agree(flags: torch.Tensor, world: int) -> list[bool]:
    """Across ranks: is each flag set on any rank? (So that all ranks stop at the same step.)"""
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]
