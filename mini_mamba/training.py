"""What both training scripts share: device and process set-up, range checks of their options and their output folder
(bench.py uses these two as well), the optimizer's parameter groups, warmup + cosine, an exponential moving average of
the weights, a training step replayed from a CUDA graph (with the gradient average across GPUs inside it, and its
teardown), checkpoints that survive interruption (written while training goes on) and are checked when read, and
Ctrl-C handling.

Nothing here is specific to a model; train_cifar.py and train_llava.py read top to bottom with these as verbs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

NO_DECAY = ("A_log", "D", "gamma", "gamma1", "gamma2", "pos_embed")   # SSM parameters, layer scales, positions


def setup(device: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world size): `device`, or CUDA when there is one. Under torchrun (WORLD_SIZE > 1) one process
    per GPU talking through NCCL — or, on CPUs, processes talking through Gloo. Warns that a CPU run is slow."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "cpu" and int(os.environ.get("RANK", "0")) == 0:
        print("note: running on the CPU — this works, but is slow; use a GPU for real runs", flush=True)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def fail(message: str, code: int = 2):
    """Stop the script with a one-line error message, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def peak_memory(device: torch.device) -> int | None:
    """The most GPU memory this process's tensors have held (since the last reset of the counter); None on a CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def output_folder(path: str | Path) -> Path:
    """The folder a script writes into, created with its parents before any work starts — or a one-line error when it
    cannot be created or written, instead of a traceback after the work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the output folder {out}: {error.strerror or error}")
    if not os.access(out, os.W_OK):
        fail(f"the output folder {out} is not writable; pass another --out")
    return out


def bounded(kind: type, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    """An argparse type: kind(text), refused with a one-line usage error when it lies outside [low, high] (open_low,
    open_high: that end excluded), e.g. `type=bounded(int, 1)` for a count, `bounded(float, 0, 1)` for a probability."""
    def parse(text: str):
        value = kind(text)                                       # not a number: argparse's "invalid int value"
        outside = not (math.isfinite(value) and low <= value <= high)              # NaN and inf too
        if outside or (open_low and value == low) or (open_high and value == high):
            if high == math.inf:
                raise argparse.ArgumentTypeError(f"{text}: must be {'above' if open_low else 'at least'} {low:g}")
            raise argparse.ArgumentTypeError(f"{text}: must be in {'(' if open_low else '['}{low:g}, {high:g}"
                                             f"{')' if open_high else ']'}")
        return value
    parse.__name__ = kind.__name__
    return parse


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: weight decay on matrices and kernels only — none on norms, biases, A_log, D and layer
    scales."""
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

    def weight(self, step: int) -> float:
        """The share of the live weights in the average after step `step`: 1 - decay."""
        return 1 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, weight: float | torch.Tensor) -> None:
        """average += weight · (live - average). weight may be a 0-dim tensor, read when the update runs (so that a
        CUDA graph that captured the update follows the ramp)."""
        ema, live = list(self.model.parameters()), list(model.parameters())
        change = torch._foreach_sub(live, ema)
        torch._foreach_mul_(change, weight)
        torch._foreach_add_(ema, change)
        buffers = list(self.model.buffers())
        if buffers:                                                      # (a model may have none)
            torch._foreach_copy_(buffers, list(model.buffers()))


class GraphedStep:
    """A training step replayed from a CUDA graph (PyTorch's "CUDA Graphs" notes, whole-network capture): the GPU runs
    the same kernels, but the CPU no longer launches each of them (about a thousand per MambaVision step). The first
    `warmup` calls run eagerly on a side stream, as capture requires (cuDNN's autotuning, the optimizer's state and
    Triton's compilation happen there, outside the graph); the next call is captured, and every call from then on
    copies its inputs into the captured ones and replays. The returned tensors are the graph's own, overwritten by the
    next call. step must have no CPU-side effects (no .item(), no Python numbers that change between calls: a
    learning rate or an EMA weight has to be a tensor)."""

    def __init__(self, step, warmup: int = 11):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph, self.inputs, self.outputs = None, None, None
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor):
        if self.calls < self.warmup:
            self.calls += 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                outputs = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return outputs
        if self.graph is None:
            self.inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*self.inputs)
        else:
            for captured, x in zip(self.inputs, inputs):
                captured.copy_(x)
        self.graph.replay()
        return self.outputs

    def release(self) -> None:
        """Free the graph (and with it what it captured: NCCL keeps a communicator alive while a graph that captured
        one of its collectives exists)."""
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
            self.graph, self.inputs, self.outputs = None, None, None


@contextlib.contextmanager
def teardown(steps, world: int) -> Iterator[None]:
    """On leaving the block, however it is left: the steps' CUDA graphs freed, then the process group destroyed. In
    that order — destroying the group while a graph still held one of its collectives hung (measured, two H200s).
    After a run that ended normally the processes first wait for each other, so that they destroy the group together:
    under torchrun on CPUs (Gloo, torch 2.14) a process that destroyed it and exited while rank 0 was still writing
    its files was, about once in a few hundred runs, aborted on the way out ("terminate called without an active
    exception"). Not after an error: a process that failed would never arrive."""
    finished = False
    try:
        yield
        finished = True
    finally:
        for step in steps:
            if isinstance(step, GraphedStep):
                step.release()
        if world > 1:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def average_gradients(model: nn.Module, world: int) -> None:
    """Each gradient replaced by its mean over the world's processes — what DistributedDataParallel does during the
    backward — as one all-reduce of one flat buffer, after the backward, with no CPU-side bookkeeping, so that a CUDA
    graph can capture it (DDP's own hooks could not be captured; see README)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])                     # one buffer: one collective
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [piece.view(g.shape) for piece, g in zip(flat.split([g.numel() for g in grads]),
                                                                          grads)])


def broadcast_(tensors: list[torch.Tensor], world: int) -> None:
    """Every process's tensors set to rank 0's (in place): the same start, and the same BatchNorm statistics."""
    if world > 1:
        for t in tensors:
            dist.broadcast(t, 0)


def learning_rates_on(optimizer: torch.optim.Optimizer, device: torch.device | None) -> None:
    """Each parameter group's learning rate as a 0-dim tensor on device (which a captured optimizer step reads at every
    replay; a Python float would be frozen into the graph), or as a float when device is None."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                value = float(group[key])
                group[key] = value if device is None else torch.tensor(value, device=device)


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_saved(path: Path, what: str, keys: tuple[str, ...], missing: str) -> dict:
    """torch.load of a file this project wrote (what: which file, for the message), checked for the entries `keys` —
    or a one-line error when there is no such file (the message `missing`), when it is not readable (truncated, not a
    torch file) or when it is another file."""
    if not path.is_file():
        fail(missing)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:                               # torch and pickle raise many types for a bad file
        fail(f"{path} could not be read as {what} ({type(error).__name__}): is it truncated, or another file?")
    absent = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    if absent:
        fail(f"{path} is not {what}: it has no {', '.join(absent)}")
    return saved


def to_cpu(obj):
    """A copy of obj — dicts, lists and tuples of tensors and plain values, as state_dict()s are — with every tensor
    copied to the CPU: a snapshot that the next training step cannot change. A GPU tensor's copy is queued on its
    stream, before the next step's kernels, into pinned memory (one synchronous copy per tensor: 24 ms for a
    MambaVision-small checkpoint on an H200 machine; queued: 6 ms): synchronize before reading the snapshot."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True, non_blocking=True)
    if isinstance(obj, dict):
        snapshot = copy.copy(obj)                                # the same type, and a state_dict's _metadata
        snapshot.update((k, to_cpu(v)) for k, v in obj.items())
        return snapshot
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """save_atomic on a background thread, so that training goes on while a checkpoint is written (MambaVision-small's
    is 140 MB: a quarter of a second of torch.save on a CPU machine). save() takes a CPU snapshot first, then waits
    for the previous write; wait() — also on leaving the `with` block, however it is left, which then ends the
    writer's thread — returns once the last write is on disk, and raises what a write raised."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def save(self, obj, path: Path) -> None:
        snapshot = to_cpu(obj)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()                             # the queued copies have landed
        self.wait()
        self.pending = self.pool.submit(save_atomic, snapshot, path)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


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
