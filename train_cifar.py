"""Train MambaVision (mini_mamba/vision.py; or a ViT of the same size, --model vit-small) on CIFAR-100 — or CIFAR-10,
Fashion-MNIST, synthetic images — on one GPU, on several (`torchrun --nproc_per_node=K train_cifar.py ...`: one
process per GPU), or slowly on a CPU.

    python train_cifar.py --dataset fashion-mnist      # about 95.9% in about 11 minutes on one H200 (README)
    python train_cifar.py --resume                     # continue the run in --out exactly where it stopped
    python train_cifar.py --dataset synthetic --model tiny --epochs 1 --limit 512 --device cpu     # a smoke run

The recipe (no flags needed): MambaVision-small, 300 epochs of 256 images; SGD with Nesterov momentum 0.9, lr 0.1 ·
batch / 256, weight decay 5e-4 except on norms, biases, A_log, D and layer scales; 3 warmup epochs, then a cosine to 0;
label smoothing 0.1; gradient clipping at 1.0; bf16 autocast on a GPU; an EMA of the weights (the model evaluated and
saved); random crop, flip and random erasing, drawn on the GPU; at test time each image's logits plus its mirror's.

Writes OUT/checkpoint.pt (after every epoch, and on Ctrl-C), OUT/model.pt (the EMA weights and the config) and
OUT/metrics.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mini_mamba import data
from mini_mamba.training import (EMA, CheckpointWriter, GraphedStep, StopRequest, agree, average_gradients, bounded,
                                 broadcast_, fail, learning_rates_on, load_saved, output_folder, param_groups,
                                 peak_memory, save_atomic, setup, teardown, warmup_cosine)
from mini_mamba.vision import SIZES, build_model

CHECK_EVERY = 10         # steps between checks for a non-finite loss and, under torchrun, for a stop request (a sync)
EVAL_BATCH = 1024
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "state", "args")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar100", choices=data.DATASETS)
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the dataset's archive or files")
    p.add_argument("--model", default="small", choices=tuple(SIZES))
    p.add_argument("--epochs", type=bounded(int, 1), default=300, metavar="N")
    p.add_argument("--batch-size", type=bounded(int, 1), default=256, metavar="N",
                   help="per process (K GPUs: K × this a step)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="initial weights, data order, augmentation")
    p.add_argument("--limit", type=bounded(int, 1), default=None, metavar="N",
                   help="only the first N training and test examples")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    p.add_argument("--out", default="runs/cifar", metavar="DIR")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    recipe = p.add_argument_group("the recipe")
    recipe.add_argument("--lr", type=bounded(float, 0, open_low=True), default=None,
                        help="peak learning rate (default: 0.1 · global batch / 256)")
    recipe.add_argument("--weight-decay", type=bounded(float, 0), default=5e-4, metavar="WD")
    recipe.add_argument("--drop-path", type=bounded(float, 0, 1, open_high=True), default=None, metavar="P",
                        help="the last block's drop-path rate (default: the size's)")
    recipe.add_argument("--warmup-epochs", type=bounded(float, 0), default=3, metavar="N")
    recipe.add_argument("--label-smoothing", type=bounded(float, 0, 1, open_high=True), default=0.1, metavar="E")
    recipe.add_argument("--ema", type=bounded(float, 0, 1, open_high=True), default=0.999, metavar="DECAY",
                        help="EMA decay per step (0: no EMA)")
    recipe.add_argument("--crop-pad", type=bounded(int, 0), default=4, metavar="N",
                        help="random crops shift by up to N pixels")
    recipe.add_argument("--erase-p", type=bounded(float, 0, 1), default=0.5, metavar="P",
                        help="random erasing's probability")
    recipe.add_argument("--clip", type=bounded(float, 0, open_low=True), default=1.0, metavar="NORM",
                        help="gradient-norm clipping")
    speed = p.add_argument_group("how a GPU runs the step (both on by default there)")
    speed.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the training step from a CUDA graph")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (about a minute of compiling)")
    return p.parse_args(argv)


def resume_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """--resume: the recipe the checkpoint in --out was saved with, and the checkpoint. Where and how to run it (the
    device, the data folder, the CUDA graph, torch.compile) come from this command line."""
    path = Path(args.out) / "checkpoint.pt"
    resumed = load_saved(path, "a checkpoint of train_cifar.py", CHECKPOINT_KEYS,
                         f"--resume: no checkpoint at {path}; start a run with the same --out first")
    known = vars(parse_args([]))
    gone = sorted(set(resumed["args"]) - set(known))
    if gone:
        fail(f"{path} was written by an older train_cifar.py with options that no longer exist "
             f"({', '.join(gone)}); start a new run")
    given = {k: getattr(args, k) for k in ("device", "data_dir") if getattr(args, k) is not None}
    how = dict(out=args.out, resume=True, cuda_graph=args.cuda_graph, compile=args.compile)
    return argparse.Namespace(**{**known, **resumed["args"], **given, **how}), resumed


class Interrupted(Exception):
    """Ctrl-C during an evaluation."""


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             rank: int, world: int, autocast, flip: bool = True, stop: StopRequest | None = None) -> float:
    """Top-1 accuracy on uint8 images (n, c, h, w), each rank a share of them; with flip each prediction is from the
    image's logits plus its mirror image's. Raises Interrupted on a stop request (one process only)."""
    model.eval()
    correct = torch.zeros((), device=images.device)
    batches = data.eval_batches(len(images), EVAL_BATCH, rank, world)
    for idx in tqdm(batches, desc="evaluating", leave=False, disable=rank != 0, dynamic_ncols=True):
        if world == 1 and stop is not None and stop.requested:
            raise Interrupted
        x = data.normalize(images[idx], mean, std).contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x).float()                                    # (b, classes)
            if flip:
                logits = logits + model(x.flip(-1).contiguous(memory_format=torch.channels_last)).float()
        correct += (logits.argmax(-1) == labels[idx]).sum()
    if world > 1:
        dist.all_reduce(correct)
    return correct.item() / len(images)                                  # the ranks together saw every image once


@dataclass
class Run:
    """What a training run holds: its options, where it runs, the data on the device, the model (train_model: as
    the step calls it, compiled or wrapped), its EMA, the optimizer, the schedule, the step, and `state` — the
    counters and history that a checkpoint saves and --resume restores."""
    args: argparse.Namespace
    out: Path
    device: torch.device
    rank: int
    world: int
    dataset: data.Dataset
    mean: torch.Tensor
    std: torch.Tensor
    model: nn.Module
    train_model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: object
    autocast: torch.autocast
    lr: float
    state: dict

    @property
    def global_batch(self) -> int:
        return self.args.batch_size * self.world

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def log(self, *message) -> None:
        if self.rank == 0:
            print(*message, flush=True)

    def evaluate(self, model: nn.Module, flip: bool = True, stop: StopRequest | None = None) -> float:
        d = self.dataset
        return evaluate(model, d.test_images, d.test_labels, self.mean, self.std, self.rank, self.world,
                        self.autocast, flip, stop)

    def save_checkpoint(self, writer: CheckpointWriter) -> None:
        """OUT/checkpoint.pt, written in the background while the next epoch trains (CheckpointWriter)."""
        if self.rank == 0:
            writer.save(dict(model=self.model.state_dict(), ema=self.ema.model.state_dict() if self.ema else None,
                             optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                             state=self.state, args=vars(self.args)), self.out / "checkpoint.pt")


def load_data(args: argparse.Namespace, device: torch.device, world: int):
    """The dataset on the device, its channel statistics, and a clear error when a batch would not fit it."""
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir).limit(args.limit)
    except data.DataError as error:
        fail(str(error))
    mean, std = (t.to(device) for t in data.channel_stats(dataset.train_images))
    if len(dataset.train_images) < args.batch_size * world:
        fail(f"the batch ({args.batch_size * world} images per step) is larger than the training set "
             f"({len(dataset.train_images)} examples)")
    return dataset.to(device), mean, std


def make_step(model: nn.Module, train_model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
              args: argparse.Namespace, world: int, ddp: bool, autocast):
    """One training step (images, labels, EMA weight) -> (loss, correct predictions), GPU scalars: forward, backward,
    the gradient average across processes when DDP does not do it, clipping, the optimizer, the EMA. GPU work only,
    so that a CUDA graph can capture it: with --cuda-graph the CPU then launches one graph instead of about a
    thousand kernels a step (GraphedStep)."""
    def train_step(images: torch.Tensor, labels: torch.Tensor, ema_weight: torch.Tensor):
        with autocast:
            logits = train_model(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and not ddp:
            average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, ema_weight)
        return loss.detach(), (logits.argmax(-1) == labels).sum()
    return GraphedStep(train_step) if args.cuda_graph else train_step


def build_run(args: argparse.Namespace, resumed: dict | None) -> Run:
    """Set-up: device and processes, data, model, EMA, optimizer and schedule, restored from the checkpoint when
    resuming; the model wrapped for several processes and compiled as asked."""
    device, rank, world = setup(args.device)
    for flag in ("cuda_graph", "compile"):                       # GPU-only ways to run the step: on by default there
        if getattr(args, flag) and device.type != "cuda":
            fail(f"--{flag.replace('_', '-')} needs a CUDA GPU; leave it out on a CPU")
        if getattr(args, flag) is None:
            setattr(args, flag, device.type == "cuda")
    torch.backends.cudnn.benchmark = True                        # fixed shapes: let cuDNN pick its kernels
    dataset, mean, std = load_data(args, device, world)
    channels, size, _ = dataset.image_shape
    torch.manual_seed(args.seed)                                 # the same initial weights on every rank
    model = build_model(args.model, channels, len(dataset.classes), args.drop_path, size).to(
        device, memory_format=torch.channels_last)
    args.drop_path = model.config.drop_path                      # checkpoints keep the rate, not "the size's"
    ema = EMA(model, args.ema) if args.ema > 0 else None
    lr = args.lr or 0.1 * args.batch_size * world / 256          # linear scaling with the global batch
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=lr, momentum=0.9, nesterov=True,
                                fused=device.type == "cuda")
    lr_device = device if args.cuda_graph else None              # a graphed step reads lr from a tensor
    learning_rates_on(optimizer, lr_device)
    steps_per_epoch = len(dataset.train_images) // (args.batch_size * world)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    state = dict(epoch=0, step_in_epoch=0, step=0, train_time_s=0.0, epoch_stats=[0.0, 0.0, 0, 0.0], history=[])
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if ema is not None:
            ema.model.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        learning_rates_on(optimizer, lr_device)                 # loading brought back the saved type
        scheduler.base_lrs = [float(x) for x in scheduler.base_lrs]
        state = resumed["state"]
    # Several processes: DistributedDataParallel averages the gradients during the backward — except under a CUDA
    # graph, whose capture DDP's hooks break; then the step averages them itself (average_gradients).
    ddp = world > 1 and not args.cuda_graph
    if ddp:                                                      # its constructor gives every rank rank 0's weights
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model
        broadcast_([*model.state_dict().values(), *(ema.model.state_dict().values() if ema else ())], world)
    if args.compile:                                             # fuses the many small elementwise kernels
        train_model = torch.compile(train_model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                              cache_enabled=not args.cuda_graph)   # no cast cache inside a graph (PyTorch docs)
    step = make_step(model, train_model, ema, optimizer, args, world, ddp, autocast)
    return Run(args, Path(args.out), device, rank, world, dataset, mean, std, model, train_model, ema, optimizer,
               scheduler, step, autocast, lr, state)


def train_epoch(run: Run, stop: StopRequest, writer: CheckpointWriter) -> None:
    """The current epoch's remaining steps, their loss, correct predictions, images and seconds added to
    state["epoch_stats"]. A non-finite loss stops the run (the last checkpoint kept); a stop request saves a checkpoint
    at this step and exits."""
    args, state, world = run.args, run.state, run.world
    epoch, first = state["epoch"], state["step_in_epoch"]
    order = torch.Generator().manual_seed(args.seed * 10007 + epoch)              # the same on every rank
    batches = data.train_batches(len(run.dataset.train_images), run.global_batch, order, run.rank, world)
    batches = batches.to(run.device)                                             # one copy an epoch
    augment_rng = torch.Generator(device=run.device)
    ema_weight = torch.zeros((), device=run.device)
    run.train_model.train()
    sums = torch.zeros(2, device=run.device)                                     # (loss · n, correct), this rank
    bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", disable=run.rank != 0,
               dynamic_ncols=True)
    started = time.perf_counter()
    for i in range(first, len(batches)):
        idx = batches[i]
        seed = (args.seed * 1_000_003 + state["step"]) * world + run.rank         # each step's draws from its
        augment_rng.manual_seed(seed)                                             # number alone: a resumed run
        torch.manual_seed(seed)                                                   # draws what the first would have
        images = data.augment(run.dataset.train_images[idx], run.mean, run.std, augment_rng, args.crop_pad,
                              args.erase_p)
        if run.ema is not None:
            ema_weight.fill_(run.ema.weight(state["step"] + 1))
        loss, correct = run.step(images, run.dataset.train_labels[idx], ema_weight)
        run.scheduler.step()
        state["step"] += 1
        sums += torch.stack([loss * len(idx), correct])
        bar.update(1)
        if (i + 1) % CHECK_EVERY and i + 1 < len(batches) and not (world == 1 and stop.requested):
            continue                                             # checks sync with the GPU: every CHECK_EVERY steps
        nonfinite, stopping = agree(torch.tensor([float(not math.isfinite(loss.item())), float(stop.requested)],
                                                 device=run.device), world)
        seen = (i + 1 - first) * len(idx)
        bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}", acc=f"{sums[1].item() / seen:.3f}",
                        img_s=f"{seen * world / (time.perf_counter() - started):,.0f}")
        if nonfinite:
            bar.close()
            fail(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}: training stopped. The last good "
                 f"checkpoint, {run.out / 'checkpoint.pt'} (end of epoch {epoch}), is kept; lower --lr or --clip "
                 "and start again, or --resume from it", code=1)
        if stopping and i + 1 < len(batches):
            bar.close()
            add_epoch_stats(run, sums, i + 1 - first, time.perf_counter() - started)
            state["step_in_epoch"] = i + 1
            interrupted(run, writer, f"at epoch {epoch + 1}, step {i + 1}")
    bar.close()
    add_epoch_stats(run, sums, len(batches) - first, time.perf_counter() - started)
    state["step_in_epoch"] = len(batches)


def add_epoch_stats(run: Run, sums: torch.Tensor, steps: int, seconds: float) -> None:
    """Add what some steps of this epoch did — sums (loss · n, correct) on this rank's images — to the epoch's totals
    over all ranks, [loss · n, correct, images, seconds], kept in the state (so a resumed epoch reports whole)."""
    if run.world > 1:
        dist.all_reduce(sums)
    loss, correct, images, time_s = run.state["epoch_stats"]
    run.state["epoch_stats"] = [loss + sums[0].item(), correct + sums[1].item(), images + steps * run.global_batch,
                                time_s + seconds]
    run.state["train_time_s"] += seconds


def interrupted(run: Run, writer: CheckpointWriter, where: str) -> None:
    """Save a checkpoint of where the run stands and exit with 130, as an interrupted program does."""
    run.save_checkpoint(writer)
    run.log(f"interrupted: saved {run.out / 'checkpoint.pt'} {where}; continue with --resume --out {run.out}")
    raise SystemExit(130)


def end_epoch(run: Run, stop: StopRequest, writer: CheckpointWriter) -> None:
    """After an epoch's steps: the BatchNorm statistics made equal across processes, the test accuracy, the history,
    the checkpoint and metrics.json."""
    state, started = run.state, time.perf_counter()
    if not isinstance(run.train_model, DistributedDataParallel):  # rank 0's statistics everywhere (DDP: each step)
        broadcast_([*run.model.buffers(), *(run.ema.model.buffers() if run.ema else ())], run.world)
    try:
        test_acc = run.evaluate(run.eval_model, stop=stop)
    except Interrupted:                                          # the steps are done: --resume evaluates
        interrupted(run, writer, f"after the steps of epoch {state['epoch'] + 1}")
    state["train_time_s"] += time.perf_counter() - started
    loss, correct, images, seconds = state["epoch_stats"]
    state["history"].append(dict(epoch=state["epoch"] + 1, train_loss=loss / images, train_acc=correct / images,
                                 test_acc=test_acc, images_per_s=images / seconds))
    run.log(f"epoch {state['epoch'] + 1}: test accuracy {test_acc:.4f} ({state['train_time_s']:.0f} s so far)")
    state.update(epoch=state["epoch"] + 1, step_in_epoch=0, epoch_stats=[0.0, 0.0, 0, 0.0])
    run.save_checkpoint(writer)
    write_metrics(run)


def write_metrics(run: Run, **final) -> dict:
    """OUT/metrics.json, after every epoch ("complete": false until the end, so an interrupted run keeps its record).
    test_acc is the EMA model's with the test-time flip; at the end test_acc_raw is the live weights' and
    test_acc_no_flip the EMA model's on the images alone, and total_time_s adds the final evaluation.
    peak_memory_bytes: the most GPU memory this process's tensors held (None on a CPU)."""
    args, state = run.args, run.state
    history = state["history"]
    timed = history[1:] or history                                       # the first epoch includes compiling
    metrics = dict(dataset=args.dataset, model=args.model, epochs=args.epochs, complete=bool(final),
                   test_acc=history[-1]["test_acc"], **final, params=sum(p.numel() for p in run.model.parameters()),
                   train_time_s=state["train_time_s"],
                   images_per_s=sum(h["images_per_s"] for h in timed) / len(timed), world_size=run.world,
                   batch_size=run.global_batch, lr=run.lr, weight_decay=args.weight_decay, drop_path=args.drop_path,
                   crop_pad=args.crop_pad, erase_p=args.erase_p, seed=args.seed, cuda_graph=args.cuda_graph,
                   compile=args.compile,
                   device=torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
                   peak_memory_bytes=peak_memory(run.device),
                   history=history)
    if run.rank == 0:
        (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def final_report(run: Run, stop: StopRequest) -> dict:
    """The EMA model and the live weights evaluated once more, OUT/model.pt, the complete metrics.json, one line."""
    started = time.perf_counter()
    try:
        final = dict(test_acc_raw=run.evaluate(run.model, stop=stop),
                     test_acc_no_flip=run.evaluate(run.eval_model, flip=False, stop=stop))
    except Interrupted:
        run.log(f"interrupted in the final evaluation; all {run.args.epochs} epochs are saved in "
                f"{run.out / 'checkpoint.pt'}: --resume --out {run.out} evaluates again")
        raise SystemExit(130)
    final["total_time_s"] = run.state["train_time_s"] + time.perf_counter() - started
    metrics = write_metrics(run, **final)
    if run.rank == 0:
        save_atomic(dict(model=run.eval_model.state_dict(), size=run.args.model, config=asdict(run.model.config),
                         dataset=run.args.dataset, classes=run.dataset.classes, test_acc=metrics["test_acc"],
                         mean=run.mean.cpu(), std=run.std.cpu()), run.out / "model.pt")
    run.log(f"test accuracy {metrics['test_acc']:.4f} (EMA with the flip; live weights {metrics['test_acc_raw']:.4f};"
            f" EMA without the flip {metrics['test_acc_no_flip']:.4f}) after {run.args.epochs} epochs, "
            f"{metrics['total_time_s']:.0f} s, {metrics['images_per_s']:,.0f} images/s; wrote {run.out / 'model.pt'}"
            f" and {run.out / 'metrics.json'}")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    args, resumed = resume_args(args) if args.resume else (args, None)
    output_folder(args.out)                                      # before any work: a clear error if it cannot be
    run = build_run(args, resumed)
    d = run.dataset
    run.log(f"{type(run.model).__name__} {args.model} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M "
            f"parameters) on "
            f"{args.dataset} ({len(d.train_images)} train / {len(d.test_images)} test, "
            f"{'×'.join(map(str, d.image_shape))}), {run.world} × {run.device.type}, batch {run.global_batch}, "
            f"{args.epochs} epochs, lr {run.lr:g}")
    if resumed is not None:
        run.log(f"resuming from {run.out / 'checkpoint.pt'} at epoch {run.state['epoch'] + 1}")
    if args.compile:
        run.log("torch.compile: the first steps compile the model, about a minute (--no-compile: the model as written)")
    writer = CheckpointWriter()
    with StopRequest() as stop, teardown([run.step], run.world), writer:   # leaving: the last checkpoint on disk
        while run.state["epoch"] < args.epochs:
            train_epoch(run, stop, writer)
            end_epoch(run, stop, writer)
            if stop.requested and run.state["epoch"] < args.epochs:
                run.log(f"interrupted after epoch {run.state['epoch']}; continue with --resume --out {run.out}")
                raise SystemExit(130)
        return final_report(run, stop)


if __name__ == "__main__":
    main()
