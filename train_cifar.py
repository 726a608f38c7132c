"""Train MambaVision (mini_mamba/vision.py) on CIFAR-100 — or CIFAR-10, Fashion-MNIST, synthetic — on one GPU, or on
several with `torchrun --nproc_per_node=K train_cifar.py ...` (one process per GPU).

    python train_cifar.py                                  # CIFAR-100, downloaded into ./data on first use
    python train_cifar.py --dataset fashion-mnist --epochs 60
    python train_cifar.py --resume                          # continue the run in --out exactly where it stopped
    python train_cifar.py --no-cuda-graph                   # the eager step (a GPU replays it from a CUDA graph)
    python train_cifar.py --no-compile                      # the model as written (a GPU trains it torch.compiled)

The recipe (defaults, no flags needed): MambaVision-small, 300 epochs of batch 256, SGD with Nesterov momentum 0.9
(lr 0.1 · batch / 256, weight decay 5e-4 except on norms, biases, A_log, D and layer scales; --optimizer adamw: AdamW,
lr 2e-3 · √(batch / 512), weight decay 0.05), linear warmup then cosine decay, label smoothing 0.1, gradient clipping
at 1.0, bf16 autocast on GPU, an EMA of the weights (the model that is evaluated and saved), random crop + flip +
random erasing computed on the GPU (CutMix with --mix P, off by default), sharpness-aware minimization (SAM) in the
last 2/15 of the epochs (--sam-epochs N: the last N; 0: off), and at test time the average of each image's logits and
its mirror image's (--no-tta: off), which the final evaluation also takes over the image moved by up to 1 pixel each
way (--tta-shift N: up to N; 0: off), the (2N + 1)² training crops that stay closest to it, each mirrored too;
--clean-epochs N trains the last N epochs on such images (no random erasing or CutMix, crops within the shifts; off by
default). The whole dataset is a GPU tensor.
On a GPU the model is trained through torch.compile (its many small elementwise kernels fused) and the training step
is captured once in a CUDA graph and replayed (GraphedStep); several GPUs then average their gradients with one
all-reduce inside the graph (average_gradients), and without the graph through DistributedDataParallel.

Writes OUT/checkpoint.pt (each epoch, on a background thread, and on Ctrl-C), OUT/model.pt (the EMA weights and
config) and OUT/metrics.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mini_mamba import data
from mini_mamba.training import (EMA, CheckpointWriter, GraphedStep, StopRequest, agree, average_gradients, bounded,
                                 broadcast_, fail, learning_rates_on, load_saved, output_folder, param_groups,
                                 save_atomic, setup, sharpness_aware, teardown, warmup_cosine)
from mini_mamba.vision import SIZES, build_model

CHECK_EVERY = 10     # steps between checks for a non-finite loss, and for a stop request under torchrun (one sync)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="cifar100", choices=data.DATASETS)
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's archive or files")
    p.add_argument("--model", default="small", choices=tuple(SIZES))
    p.add_argument("--epochs", type=bounded(int, 1), default=300)
    p.add_argument("--batch-size", type=bounded(int, 1), default=256,
                   help="batch per process (K GPUs: K × this per step)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                   help="SGD with Nesterov momentum 0.9, or AdamW")
    p.add_argument("--lr", type=bounded(float, 0, open_low=True), default=None,
                   help="peak learning rate (default: SGD 0.1 · global batch / 256,\n"
                        "AdamW 2e-3 · √(global batch / 512))")
    p.add_argument("--weight-decay", type=bounded(float, 0), default=None, help="default: SGD 5e-4, AdamW 0.05")
    p.add_argument("--drop-path", type=bounded(float, 0, 1, open_high=True), default=None,
                   help="the last block's drop-path rate (default: the model size's)")
    p.add_argument("--warmup-epochs", type=bounded(float, 0), default=3)
    p.add_argument("--label-smoothing", type=bounded(float, 0, 1, open_high=True), default=0.1)
    p.add_argument("--ema", type=bounded(float, 0, 1, open_high=True), default=0.999,
                   help="EMA decay per step (0 disables the EMA)")
    p.add_argument("--crop-pad", type=bounded(int, 0), default=4,
                   help="random crops shift the image by up to this many pixels")
    p.add_argument("--erase-p", type=bounded(float, 0, 1), default=0.5, help="probability of random erasing per image")
    p.add_argument("--erase-fill", default="mean", choices=("mean", "random"),
                   help="what an erased rectangle holds: the mean, or random pixels (the paper's RE-R)")
    p.add_argument("--mix", type=bounded(float, 0, 1), default=0.0, help="probability of CutMix per batch (0: off)")
    p.add_argument("--clip", type=bounded(float, 0, open_low=True), default=1.0, help="gradient-norm clipping")
    p.add_argument("--sam-epochs", type=bounded(int, 0), default=None,
                   help="the last N epochs step with sharpness-aware minimization (SAM): each step's gradient is\n"
                        "taken at the weights moved --sam-rho up the loss; two forward/backward passes a step\n"
                        "(default: the last 2/15 of the epochs, rounded down: 40 of 300; 0: off)")
    p.add_argument("--sam-rho", type=bounded(float, 0, open_low=True), default=0.05, help="SAM's radius ρ")
    p.add_argument("--clean-epochs", type=bounded(int, 0), default=0,
                   help="the last N epochs train on images like the final test-time views: no random erasing or\n"
                        "CutMix, crops shifted by at most --tta-shift pixels (0: off, the default: the README has\n"
                        "three draws, no gain)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time flip: average the logits of each test image and its mirror image")
    p.add_argument("--tta-shift", type=bounded(int, 0), default=1,
                   help="the final evaluation also averages the logits of each test image moved by every (dy, dx) in\n"
                        "[-N, N]² (each mirrored too with --tta); the evaluation after each epoch does not (0: off)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the training step from a CUDA graph: the CPU stops launching each kernel\n"
                        "(default: on with a GPU, off on a CPU; --no-cuda-graph: the eager step)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train through torch.compile(model): fused elementwise kernels, the step 1.5x faster on an\n"
                        "H200 (README) after about a minute of compiling (default: on with a GPU, off on a CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights, data order, augmentation (recorded in metrics.json; on Fashion-MNIST the\n"
                        "final accuracy spans about 0.3 points over five seeds, and a GPU run does not repeat bit\n"
                        "for bit: README)")
    p.add_argument("--limit", type=bounded(int, 1), default=None,
                   help="use only the first N training and test examples")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--out", default="runs/cifar")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = p.parse_args(argv)                                    # each number checked by its type (bounded)
    if args.weight_decay is None:
        args.weight_decay = {"sgd": 5e-4, "adamw": 0.05}[args.optimizer]
    if args.sam_epochs is None:
        args.sam_epochs = args.epochs * 2 // 15                  # SAM in the last 40 of 300 epochs (README)
    for name in ("sam_epochs", "clean_epochs"):
        if getattr(args, name) > args.epochs:
            p.error(f"--{name.replace('_', '-')} must be at most --epochs")
    return args


def tta_views(shift: int, flip: bool) -> list[tuple[int, int, bool]]:
    """The test-time views of an image as (dy, dx, mirrored): moved by every (dy, dx) in [-shift, shift]² (data.shift:
    the training's random crops, fixed), each also mirrored with flip (the training's flip); tta_views(0, False) is
    the image alone."""
    moves = range(-shift, shift + 1)
    return [(dy, dx, mirrored) for dy in moves for dx in moves for mirrored in ((False, True) if flip else (False,))]


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size, rank, world, autocast,
             views: list[tuple[int, int, bool]]) -> float:
    """Top-1 accuracy on (images, labels), each rank a share of the examples, summed across ranks; each prediction is
    from the sum of the logits of the image's views (tta_views)."""
    model.eval()
    correct = torch.zeros((), device=images.device)
    for idx in data.eval_batches(len(images), batch_size, rank, world):
        logits = torch.zeros((), device=images.device)                   # (b, classes) once the first view is in
        for dy, dx, mirrored in views:
            x = data.normalize(data.shift(images[idx], dy, dx), mean, std)
            x = (x.flip(-1) if mirrored else x).contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = logits + model(x).float()
        correct += (logits.argmax(-1) == labels[idx]).sum()
    if world > 1:
        dist.all_reduce(correct)
    return correct.item() / len(images)                                  # the ranks together saw every image once


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    resumed = None
    if args.resume:
        resumed = load_saved(checkpoint_path, "a checkpoint of train_cifar.py",
                             ("model", "ema", "optimizer", "scheduler", "state", "args"),
                             f"--resume: no checkpoint at {checkpoint_path}; start a run with the same --out first")
        given = {k: getattr(args, k) for k in ("device", "data_dir") if getattr(args, k) is not None}
        before_options = dict(optimizer="adamw", sam_epochs=0, tta_shift=0)  # what runs saved before them used
        saved = resumed["args"]
        if saved.get("drop_path") is None and saved.get("model") == "small":    # saved as "the size's rate" before
            saved = {**saved, "drop_path": 0.1}                                 # small's became 0.05 (2026-12-02)
        args = argparse.Namespace(**{**vars(parse_args([])), **before_options, **saved, **given,
                                     "out": args.out, "resume": True,    # other options newer than the run: defaults
                                     "cuda_graph": args.cuda_graph,      # how to run the step, not the recipe
                                     "compile": args.compile})
    out = output_folder(out)                                     # before any work: a clear error if it cannot be
    device, rank, world = setup(args.device)
    for flag in ("cuda_graph", "compile"):                       # GPU-only ways to run the step: on by default there
        if getattr(args, flag) and device.type != "cuda":
            fail(f"--{flag.replace('_', '-')} needs a CUDA GPU; leave it out on a CPU")
        if getattr(args, flag) is None:
            setattr(args, flag, device.type == "cuda")
    torch.backends.cudnn.benchmark = True                                # fixed shapes: let cuDNN pick its kernels
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)

    try:
        dataset = data.load_dataset(args.dataset, args.data_dir).limit(args.limit)
    except data.DataError as error:
        fail(str(error))
    mean, std = (t.to(device) for t in data.channel_stats(dataset.train_images))
    dataset = dataset.to(device)
    channels, size, _ = dataset.image_shape
    if 2 * args.tta_shift >= size:
        fail(f"--tta-shift {args.tta_shift} would move the {size}×{size} images out of view: use at most "
             f"{(size - 1) // 2}")
    n_train = len(dataset.train_images)
    global_batch = args.batch_size * world
    if n_train < global_batch:
        fail(f"the batch ({global_batch} images per step) is larger than the training set ({n_train} examples)")

    torch.manual_seed(args.seed)                                         # the same initial weights on every rank
    model = build_model(args.model, channels, len(dataset.classes), drop_path=args.drop_path
                        ).to(device, memory_format=torch.channels_last)
    args.drop_path = model.config.drop_path                      # checkpoints keep the rate, not "the size's"
    params = sum(p.numel() for p in model.parameters())
    ema = EMA(model, args.ema) if args.ema > 0 else None
    groups, fused = param_groups(model, args.weight_decay), device.type == "cuda"
    if args.optimizer == "adamw":
        lr = args.lr or 2e-3 * math.sqrt(global_batch / 512)         # square-root scaling for Adam
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused, capturable=args.cuda_graph)
    else:
        lr = args.lr or 0.1 * global_batch / 256                     # linear scaling for SGD
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused)
    lr_device = device if args.cuda_graph else None                 # a graphed step reads lr from a tensor
    learning_rates_on(optimizer, lr_device)
    steps_per_epoch = n_train // global_batch
    total_steps = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    state = dict(epoch=0, step_in_epoch=0, step=0, train_time_s=0.0, images=0, history=[])
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if ema is not None:
            ema.model.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        learning_rates_on(optimizer, lr_device)
        scheduler.base_lrs = [float(x) for x in scheduler.base_lrs]
        state = resumed["state"]
        log(f"resuming from {checkpoint_path}: epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    # Several GPUs: DistributedDataParallel; with --cuda-graph, whose capture DDP's hooks fail (README), the step
    # averages the gradients itself with one all-reduce after the backward (average_gradients).
    ddp = world > 1 and not args.cuda_graph
    if ddp:                                                      # its constructor gives every rank rank 0's weights
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:                                                        # the same start on every rank, as DDP's
        train_model = model
        broadcast_([*model.state_dict().values(), *(ema.model.state_dict().values() if ema else ())], world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                              cache_enabled=not args.cuda_graph)   # no cast cache inside a graph (PyTorch docs)
    eval_model = ema.model if ema is not None else model
    test_set = (dataset.test_images, dataset.test_labels, mean, std, 1024, rank, world, autocast)
    log(f"MambaVision-{args.model} ({params / 1e6:.2f}M parameters) on {args.dataset} "
        f"({n_train} train / {len(dataset.test_images)} test, {channels}×{size}×{size}), {world} × {device.type}, "
        f"batch {global_batch}, {args.epochs} epochs, lr {lr:g}")
    if args.compile:                                             # compiled on the first step (weights stay shared)
        train_model = torch.compile(train_model)
        log("torch.compile: the first steps compile the model, about a minute (--no-compile: the model as written)")

    writer = CheckpointWriter()

    def save_checkpoint():
        if main_process:                                         # written in the background (CheckpointWriter)
            writer.save(dict(model=model.state_dict(), ema=ema.model.state_dict() if ema else None,
                             optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), state=state,
                             args=vars(args)), checkpoint_path)

    augment_rng = torch.Generator(device=device)

    def seed_step(seed: int) -> None:
        """Each step's randomness from its number alone, so a resumed run draws exactly what the first would have."""
        augment_rng.manual_seed(seed)
        torch.manual_seed(seed)

    def backward(images: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss on a batch whose images are the share lam their own and 1 - lam their predecessor's in the batch
        (CutMix), its gradient left in .grad; returns the loss and the logits."""
        with autocast:
            logits = train_model(images.contiguous(memory_format=torch.channels_last))
        loss_on = lambda y: F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        loss = loss_on(labels) if args.mix == 0 else lam * loss_on(labels) + (1 - lam) * loss_on(labels.roll(1, 0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits

    def train_step(images: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor, ema_weight: torch.Tensor,
                   sam: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step — with sam, on the gradient taken again at the weights moved up the loss (each process
        its own ascent, as the SAM paper's per-accelerator batches; under DDP, whose backward averages the gradients,
        the ascent of their mean) — then the EMA update; returns the loss and the number of correct predictions of
        the own labels (GPU scalars). GPU work only, so that --cuda-graph can capture it."""
        loss, logits = backward(images, labels, lam)
        if sam:
            with sharpness_aware(model, args.sam_rho):
                backward(images, labels, lam)
        if world > 1 and not ddp:
            average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, ema_weight)
        return loss.detach(), (logits.argmax(-1) == labels).sum()

    steps = [functools.partial(train_step, sam=sam) for sam in (False, True)]    # SGD's step, SAM's step
    if args.cuda_graph:
        steps = [GraphedStep(step) for step in steps]                   # each captured when first needed
    ema_weight = torch.zeros((), device=device)

    def write_metrics(**final) -> dict:
        """OUT/metrics.json after every epoch ("complete": false until the last), so an interrupted run keeps its
        record; test_acc is the EMA model's (the one saved), at the end with all test-time views; test_acc_raw the
        live weights' at the end; test_acc_no_flip the EMA model's on the images alone; test_acc_no_shift (with
        --tta-shift) the EMA model's with the flip alone, as after each epoch."""
        history = state["history"]
        timed = history[1:] or history                                   # the first epoch includes warm-up
        metrics = dict(dataset=args.dataset, model=args.model, epochs=args.epochs, complete=bool(final),
                       **{"test_acc": history[-1]["test_acc"], **final}, params=params,
                       train_time_s=state["train_time_s"],
                       images_per_s=sum(h["images_per_s"] for h in timed) / len(timed), world_size=world,
                       batch_size=global_batch, optimizer=args.optimizer, lr=lr,
                       weight_decay=args.weight_decay, drop_path=model.config.drop_path,
                       crop_pad=args.crop_pad, erase_p=args.erase_p, erase_fill=args.erase_fill, mix=args.mix,
                       sam_epochs=args.sam_epochs, sam_rho=args.sam_rho, clean_epochs=args.clean_epochs,
                       tta=args.tta, tta_shift=args.tta_shift, seed=args.seed, cuda_graph=args.cuda_graph,
                       compile=args.compile,
                       device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       history=history)
        if main_process:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    with StopRequest() as stop, teardown(steps, world), writer:    # leaving: the last checkpoint on disk
        while state["epoch"] < args.epochs:
            epoch = state["epoch"]
            order = torch.Generator().manual_seed(args.seed * 10007 + epoch)        # the same on every rank
            batches = data.train_batches(n_train, global_batch, order, rank, world).to(device)   # one copy an epoch
            train_model.train()
            sums = torch.zeros(2, device=device)                 # (loss · n, correct) over this rank's images
            bar = tqdm(total=len(batches), initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not main_process, dynamic_ncols=True)
            started, images_before = time.perf_counter(), state["images"]
            first_step = state["step_in_epoch"]
            step_fn = steps[epoch >= args.epochs - args.sam_epochs]
            clean = epoch >= args.epochs - args.clean_epochs             # the test-time views' images (--clean-epochs)
            crop_pad, erase_p, mix = (min(args.crop_pad, args.tta_shift), 0.0, 0.0) if clean else \
                (args.crop_pad, args.erase_p, args.mix)
            for i in range(first_step, len(batches)):
                idx = batches[i]
                seed_step((args.seed * 1_000_003 + state["step"]) * world + rank)   # augmentation, drop-path
                images = data.augment(dataset.train_images[idx], mean, std, augment_rng, crop_pad, erase_p,
                                      args.erase_fill)
                images, lam = data.cutmix(images, augment_rng, mix)
                if ema is not None:
                    ema_weight.fill_(ema.weight(state["step"] + 1))
                loss, correct = step_fn(images, dataset.train_labels[idx], lam, ema_weight)
                scheduler.step()
                state["step"] += 1
                sums += torch.stack([loss * len(idx), correct])
                state["images"] += global_batch
                seen = (i + 1 - first_step) * len(idx)           # this rank's images since the epoch (re)started
                bar.update(1)
                at_check = (i + 1) % CHECK_EVERY == 0 or i + 1 == len(batches)
                if not at_check and not (world == 1 and stop.requested):   # one process: stop at the next step
                    continue
                nonfinite, stopping = agree(torch.tensor([float(not math.isfinite(loss.item())),
                                                          float(stop.requested)], device=device), world)
                bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}", acc=f"{sums[1].item() / seen:.3f}",
                                img_s=f"{(state['images'] - images_before) / (time.perf_counter() - started):,.0f}")
                if nonfinite:
                    bar.close()
                    fail(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}: training stopped. The "
                         f"last good checkpoint, {checkpoint_path} (from the end of epoch {epoch}), is kept; lower "
                         "--lr or --clip and start again, or --resume from it", code=1)
                if stopping and i + 1 < len(batches):
                    bar.close()
                    state["step_in_epoch"] = i + 1
                    state["train_time_s"] += time.perf_counter() - started
                    save_checkpoint()
                    log(f"interrupted: saved {checkpoint_path} at epoch {epoch + 1}, step {i + 1}; "
                        f"continue with --resume --out {out}")
                    raise SystemExit(130)
            bar.close()
            train_seconds = time.perf_counter() - started
            if not ddp:                                  # rank 0's BatchNorm statistics everywhere (DDP: each step)
                broadcast_([*model.buffers(), *(ema.model.buffers() if ema else ())], world)
            test_acc = evaluate(eval_model, *test_set, tta_views(0, args.tta))
            state["train_time_s"] += time.perf_counter() - started
            if world > 1:
                dist.all_reduce(sums)
            seen = (len(batches) - first_step) * global_batch      # all ranks' images since the epoch (re)started
            state["history"].append(dict(epoch=epoch + 1, train_loss=sums[0].item() / seen,
                                         train_acc=sums[1].item() / seen, test_acc=test_acc,
                                         images_per_s=(state["images"] - images_before) / train_seconds))
            log(f"epoch {epoch + 1}: test accuracy {test_acc:.4f} ({state['train_time_s']:.0f} s so far)")
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            save_checkpoint()
            write_metrics()
            if stop.requested and state["epoch"] < args.epochs:
                log(f"interrupted after epoch {epoch + 1}; continue with --resume --out {out}")
                raise SystemExit(130)

        views = tta_views(args.tta_shift, args.tta)
        final = dict(test_acc_raw=evaluate(model, *test_set, views),
                     test_acc_no_flip=evaluate(eval_model, *test_set, tta_views(0, False)))
        if args.tta_shift:                               # more views than after each epoch; else its figure stands
            final.update(test_acc=evaluate(eval_model, *test_set, views),
                         test_acc_no_shift=state["history"][-1]["test_acc"])
        metrics = write_metrics(**final)
        if main_process:
            save_atomic(dict(model=eval_model.state_dict(), size=args.model, config=asdict(model.config),
                             dataset=args.dataset, classes=dataset.classes, test_acc=metrics["test_acc"],
                             mean=mean.cpu(), std=std.cpu()), out / "model.pt")
            no_shift = f"without the shifts {final['test_acc_no_shift']:.4f}; " if args.tta_shift else ""
            log(f"test accuracy {metrics['test_acc']:.4f} (EMA, {len(views)} test-time views; {no_shift}live weights "
                f"{metrics['test_acc_raw']:.4f}; EMA on the images alone {metrics['test_acc_no_flip']:.4f}) after "
                f"{args.epochs} epochs, {metrics['train_time_s']:.0f} s, {metrics['images_per_s']:,.0f} images/s; "
                f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
