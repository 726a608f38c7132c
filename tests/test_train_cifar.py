"""train_cifar.py's command-line contract: smoke runs on synthetic data and on Fashion-MNIST, exact resume after an
interruption, a non-finite loss stopping the run with the last good checkpoint kept, and clear errors (out-of-range
options of train_llava.py too: both scripts check them with the same `bounded`)."""
import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_cifar
import train_llava
from mini_mamba import data
from mini_mamba.training import (EMA, CheckpointWriter, GraphedStep, average_gradients, bounded, broadcast_,
                                 sharpness_aware)
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--limit", "96", "--batch-size", "32"]
SMOKE = ["--dataset", "synthetic", *TINY, "--device", "cpu",      # on the CPU: bit-exact, for resume and NaN;
         "--tta-shift", "0"]                      # the final 18 test-time views take seconds there: only where tested


@pytest.mark.parametrize("erase_fill", ["mean", "random"])
def test_smoke_run_on_synthetic_writes_the_contracted_files(tmp_path, erase_fill):
    metrics = train_cifar.main(["--dataset", "synthetic", *TINY, "--epochs", "1", "--device", DEVICE.type,
                                "--erase-fill", erase_fill, "--seed", "3", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("dataset", "epochs", "test_acc", "params", "train_time_s", "images_per_s"):
        assert key in written
    assert written["complete"] and written["dataset"] == "synthetic" and 0.0 <= written["test_acc"] <= 1.0
    assert written["test_acc"] == metrics["test_acc"] and written["params"] > 0 and written["erase_fill"] == erase_fill
    assert written["seed"] == 3                                     # the runs' accuracy moves with it: recorded
    assert written["cuda_graph"] == written["compile"] == (DEVICE.type == "cuda")     # on by default on a GPU only
    assert written["tta_shift"] == 1 and written["sam_epochs"] == 0          # the defaults; 2/15 of 1 epoch is none
    assert written["clean_epochs"] == 0                                      # off by default
    assert written["test_acc_no_shift"] == written["history"][-1]["test_acc"]   # the flip alone, as each epoch
    assert 0.0 <= written["test_acc_no_flip"] <= 1.0 and 0.0 <= written["test_acc_raw"] <= 1.0
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert saved["size"] == "tiny" and len(saved["classes"]) == 10


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_smoke_run_on_fashion_mnist(tmp_path):
    metrics = train_cifar.main(["--dataset", "fashion-mnist", *TINY, "--epochs", "1", "--device", DEVICE.type,
                                "--out", str(tmp_path)])
    assert metrics["dataset"] == "fashion-mnist" and metrics["history"][0]["epoch"] == 1


def test_the_test_time_flip_predicts_from_the_logits_of_the_image_plus_those_of_its_mirror_image():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 5, 4))     # not mirror-symmetric
    images = torch.randint(0, 256, (40, 2, 3, 5), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.6]), torch.tensor([0.2, 0.3])
    x = data.normalize(images, mean, std)
    with torch.no_grad():
        plain, both = model(x), model(x) + model(x.flip(-1))
    labels = both.argmax(-1)                                         # right for every image with the flip
    assert not torch.equal(plain.argmax(-1), labels)                 # the flip changes some predictions
    off = torch.autocast("cpu", enabled=False)
    evaluate = lambda flip: train_cifar.evaluate(model, images, labels, mean, std, 16, 0, 1, off,
                                                 train_cifar.tta_views(0, flip))
    assert evaluate(True) == 1.0
    assert evaluate(False) == pytest.approx((plain.argmax(-1) == labels).float().mean().item())


@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("flip", [False, True])
def test_the_test_time_views_are_every_shift_up_to_n_pixels_each_way_each_mirrored_with_the_flip(shift, flip):
    views = train_cifar.tta_views(shift, flip)
    moves = range(-shift, shift + 1)
    assert sorted(views) == sorted((dy, dx, m) for dy in moves for dx in moves for m in {False, flip})
    assert len(views) == (2 * shift + 1) ** 2 * (2 if flip else 1)


def test_the_test_time_shifts_predict_from_the_logits_of_all_the_views():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 6, 5))
    images = torch.randint(0, 256, (60, 1, 6, 6), dtype=torch.uint8)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])

    @torch.no_grad()
    def logits(views):                                               # summed over the views, by hand
        moved = lambda dy, dx: data.normalize(data.shift(images, dy, dx), mean, std)
        return sum(model(moved(dy, dx).flip(-1) if mirrored else moved(dy, dx)) for dy, dx, mirrored in views)

    views, flip_only = train_cifar.tta_views(1, True), train_cifar.tta_views(0, True)
    labels = logits(views).argmax(-1)                                # right for every image with all 18 views
    assert not torch.equal(logits(flip_only).argmax(-1), labels)     # the shifts change some predictions
    off = torch.autocast("cpu", enabled=False)
    evaluate = lambda views: train_cifar.evaluate(model, images, labels, mean, std, 16, 0, 1, off, views)
    assert evaluate(views) == 1.0
    assert evaluate(flip_only) == pytest.approx((logits(flip_only).argmax(-1) == labels).float().mean().item())


def test_without_test_time_shifts_the_final_accuracy_is_the_last_epochs(tmp_path):
    metrics = train_cifar.main([*SMOKE, "--epochs", "1", "--out", str(tmp_path)])     # SMOKE: --tta-shift 0
    assert metrics["tta_shift"] == 0 and "test_acc_no_shift" not in metrics
    assert metrics["test_acc"] == metrics["history"][-1]["test_acc"]


@pytest.mark.parametrize("epochs, sam_epochs", [(300, 40), (150, 20), (16, 2), (15, 2), (14, 1), (7, 0), (1, 0)])
def test_sam_takes_the_last_two_fifteenths_of_the_epochs_by_default(epochs, sam_epochs):
    assert train_cifar.parse_args(["--epochs", str(epochs)]).sam_epochs == sam_epochs
    assert train_cifar.parse_args(["--epochs", str(epochs), "--sam-epochs", "0"]).sam_epochs == 0


def test_a_test_time_shift_out_of_the_image_is_a_clear_error(tmp_path):
    result = run_script(*SMOKE, "--epochs", "1", "--tta-shift", "16", "--out", str(tmp_path))   # 32×32 images
    assert result.returncode == 2 and "--tta-shift 16 would move the 32×32 images out of view" in result.stderr
    assert "Traceback" not in result.stderr


def interrupt_at_step(monkeypatch, step: int):
    """Deliver a real SIGINT (Ctrl-C) to this process while the given training step is being prepared."""
    calls = {"n": 0}
    augment = data.augment
    def augment_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return augment(*args, **kwargs)
    monkeypatch.setattr(train_cifar.data, "augment", augment_then_interrupt)


@pytest.mark.parametrize("options, step", [(["--optimizer", "sgd"], 2),   # mid-epoch 1 of 2 (3 steps per epoch);
                                           (["--optimizer", "adamw"], 2),  # each optimizer's state resumed
                                           (["--sam-epochs", "1"], 2),     # before SAM's last epoch, and
                                           (["--sam-epochs", "1"], 5),     # in the middle of it
                                           (["--clean-epochs", "1"], 5)])  # in the middle of the clean epoch
def test_resume_after_an_interruption_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, options, step):
    run = SMOKE + ["--epochs", "2", "--seed", "3", "--mix", "0.5", *options]  # CutMix draws are resumed exactly too
    train_cifar.main(run + ["--out", str(tmp_path / "straight")])

    interrupt_at_step(monkeypatch, step)
    with pytest.raises(SystemExit) as stopped:
        train_cifar.main(run + ["--out", str(tmp_path / "resumed")])
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == (step - 1) // 3 and 0 < saved["state"]["step_in_epoch"] < 3
    monkeypatch.undo()
    train_cifar.main(["--resume", "--out", str(tmp_path / "resumed")])      # device and recipe from the checkpoint

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), f"{key}.{name} differs after resume"


def resume_with_saved_args_edited(tmp_path, monkeypatch, options: list[str], edit) -> dict:
    """Interrupt a run with these options at its second step, apply edit to the args its checkpoint saved (as a run
    from another machine or an older version would have saved them), then --resume it; returns its metrics."""
    interrupt_at_step(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train_cifar.main(SMOKE + ["--epochs", "1", *options, "--out", str(tmp_path)])
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    edit(checkpoint["args"])
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    return train_cifar.main(["--resume", "--out", str(tmp_path)])


def test_a_run_started_with_the_cuda_graph_resumes_on_a_cpu(tmp_path, monkeypatch):
    # whether the step is replayed from a graph is how the run is executed, not part of its recipe: not restored
    metrics = resume_with_saved_args_edited(tmp_path, monkeypatch, [],          # as a GPU run (on by default) saves it
                                            lambda args: args.update(cuda_graph=True))
    assert metrics["complete"] and not metrics["cuda_graph"]


def test_a_checkpoint_from_before_the_optimizer_option_resumes_with_adamw(tmp_path, monkeypatch):
    metrics = resume_with_saved_args_edited(tmp_path, monkeypatch, ["--optimizer", "adamw"],
                                            lambda args: args.pop("optimizer"))  # saved before the option existed
    assert metrics["complete"] and metrics["optimizer"] == "adamw"


def test_a_checkpoint_from_before_sam_and_the_shifts_resumes_with_neither(tmp_path, monkeypatch):
    def saved_before_the_options(args):
        del args["sam_epochs"], args["tta_shift"], args["clean_epochs"]
    metrics = resume_with_saved_args_edited(tmp_path, monkeypatch, ["--sam-epochs", "0"],
                                            saved_before_the_options)
    assert metrics["complete"] and metrics["sam_epochs"] == 0 and metrics["tta_shift"] == 0
    assert metrics["clean_epochs"] == 0                              # newer than those runs: its default, off


def test_a_small_checkpoint_from_before_its_rate_changed_resumes_with_drop_path_0_1(tmp_path, monkeypatch):
    def saved_as_the_sizes_rate(args):
        assert args["drop_path"] == 0.05                         # runs save the rate itself: small's, today
        args["drop_path"] = None                                 # as runs saved it while small's rate was 0.1
    metrics = resume_with_saved_args_edited(tmp_path, monkeypatch, ["--model", "small"], saved_as_the_sizes_rate)
    assert metrics["complete"] and metrics["drop_path"] == 0.1


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    train_cifar.main(SMOKE + ["--epochs", "1", "--out", str(tmp_path)])
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]

    cross_entropy = train_cifar.F.cross_entropy
    monkeypatch.setattr(train_cifar.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as stopped:
        train_cifar.main(SMOKE + ["--epochs", "2", "--out", str(tmp_path)])
    assert stopped.value.code == 1
    assert "the loss became nan" in capsys.readouterr().err
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(good[name], kept[name]) for name in good)


def run_script(*args: str, processes: int = 0) -> subprocess.CompletedProcess:
    """train_cifar.py in a fresh interpreter; with processes=K under torchrun (K processes on this machine)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    return subprocess.run([sys.executable, *launch, "train_cifar.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_two_processes_under_torchrun_train_together(tmp_path):
    result = run_script(*SMOKE, "--batch-size", "16", "--epochs", "2", "--sam-epochs", "1", "--tta-shift", "1",
                        "--out", str(tmp_path), processes=2)        # the defaults' SAM and shifts, under DDP too
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] and metrics["world_size"] == 2 and metrics["batch_size"] == 32   # 16 per process
    assert metrics["sam_epochs"] == 1 and metrics["tta_shift"] == 1 and "test_acc_no_shift" in metrics
    assert result.stdout.count("test accuracy") == 3                 # rank 0 alone logs: 2 epochs and the end


def _average_and_broadcast(rank: int, world: int, init: str) -> None:
    """One process of the test below (module level, so that it can be spawned)."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    model.to(memory_format=torch.channels_last)                     # strided gradients, as MambaVision's
    for p in model.parameters():
        ramp = torch.arange(p.numel(), dtype=p.dtype).view(p.shape)
        p.grad = (ramp * (rank + 1)).contiguous(memory_format=torch.channels_last if p.dim() == 4 else
                                                 torch.contiguous_format)
    average_gradients(model, world)
    for p in model.parameters():                                    # mean of ramp · 1, ..., ramp · world
        torch.testing.assert_close(p.grad, torch.arange(p.numel(), dtype=p.dtype).view(p.shape) * (world + 1) / 2)
    tensors = [torch.full((4,), float(rank)), torch.full((2, 2), float(rank))]
    broadcast_(tensors, world)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in tensors)  # rank 0's values everywhere
    torch.distributed.destroy_process_group()


def test_average_gradients_gives_every_process_the_mean_gradient_and_broadcast_rank_0s_tensors(tmp_path):
    world = 3
    torch.multiprocessing.spawn(_average_and_broadcast, args=(world, f"file://{tmp_path / 'rendezvous'}"),
                                nprocs=world)


def test_missing_cifar_is_a_message_not_a_traceback(tmp_path):
    result = run_script("--dataset", "cifar100", "--data-dir", str(tmp_path), "--device", "cpu", "--out",
                        str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: no cifar-100-python.tar.gz" in result.stderr and "Traceback" not in result.stderr


class Quadratic(torch.nn.Module):
    """loss(w) = ½ wᵀ H w, whose gradient is H w; each forward pass also counts itself in a buffer, as BatchNorm's
    num_batches_tracked does."""

    def __init__(self, w: torch.Tensor, H: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.register_buffer("H", H)
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))

    def forward(self) -> torch.Tensor:
        self.passes += 1
        return 0.5 * self.w @ self.H @ self.w


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), rho=st.floats(1e-3, 1.0), seed=st.integers(0, 2 ** 31))
def test_sam_takes_the_gradient_at_the_weights_moved_rho_along_the_gradient_then_puts_them_back(n, rho, seed):
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=generator, dtype=torch.float64)
    H, w = M @ M.T + torch.eye(n, dtype=torch.float64), torch.randn(n, generator=generator, dtype=torch.float64)
    model = Quadratic(w, H)
    model().backward()
    g = H @ w
    assert torch.allclose(model.w.grad, g)
    with sharpness_aware(model, rho):
        epsilon = model.w.detach() - w
        assert torch.allclose(epsilon, rho * g / g.norm())                   # the steepest ascent of radius rho
        model.w.grad = None
        model().backward()
    assert torch.equal(model.w.detach(), w) and model.passes.item() == 1     # w and the buffers as they were
    assert torch.allclose(model.w.grad, H @ (w + epsilon))                   # SAM's gradient is kept


def test_sam_steps_exactly_in_the_last_sam_epochs(tmp_path, monkeypatch):
    ascents = []
    def counted(model, rho):
        ascents.append(rho)
        return sharpness_aware(model, rho)
    monkeypatch.setattr(train_cifar, "sharpness_aware", counted)
    metrics = train_cifar.main(SMOKE + ["--epochs", "3", "--sam-epochs", "1", "--sam-rho", "0.2",
                                        "--out", str(tmp_path)])
    assert ascents == [0.2] * 3                                              # 3 steps an epoch: the last epoch's
    assert metrics["sam_epochs"] == 1 and metrics["sam_rho"] == 0.2


@pytest.mark.parametrize("crop_pad, tta_shift", [(3, 0), (3, 1), (1, 6)])
def test_the_last_clean_epochs_train_without_erasing_or_cutmix_and_with_crops_within_the_test_time_shifts(
        tmp_path, monkeypatch, crop_pad, tta_shift):
    calls = []                                                   # [pad, erase_p, CutMix's p] of each batch
    augment, cutmix = data.augment, data.cutmix
    def recorded_augment(images, mean, std, generator, pad, erase_p, erase_fill):
        calls.append([pad, erase_p])
        return augment(images, mean, std, generator, pad, erase_p, erase_fill)
    def recorded_cutmix(images, generator, p):
        calls[-1].append(p)
        return cutmix(images, generator, p)
    monkeypatch.setattr(data, "augment", recorded_augment)
    monkeypatch.setattr(data, "cutmix", recorded_cutmix)
    monkeypatch.setattr(train_cifar, "evaluate", lambda *args: 0.5)  # 338 test-time views at --tta-shift 6: minutes
    metrics = train_cifar.main(SMOKE[:-1] + [str(tta_shift), "--epochs", "3", "--clean-epochs", "2",
                                             "--crop-pad", str(crop_pad), "--erase-p", "0.7", "--mix", "0.4",
                                             "--out", str(tmp_path)])
    assert calls == [[crop_pad, 0.7, 0.4]] * 3 + [[min(crop_pad, tta_shift), 0.0, 0.0]] * 6   # 3 steps an epoch
    assert metrics["clean_epochs"] == 2 and metrics["complete"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = run_script("--resume", "--out", str(tmp_path))
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:1000]), "could not be read as a checkpoint of train_cifar.py"),
    (lambda path: torch.save(torch.load(path, weights_only=False)["model"], path),   # a state_dict, not a checkpoint
     "is not a checkpoint of train_cifar.py: it has no model, ema, optimizer, scheduler, state, args"),
])
def test_resume_from_a_damaged_or_wrong_checkpoint_is_a_clear_error(tmp_path, capsys, damage, message):
    train_cifar.main(SMOKE + ["--epochs", "1", "--out", str(tmp_path)])
    damage(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_cifar.main(["--resume", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("with_buffers", [False, True])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_the_ema_moves_each_weight_its_share_towards_the_live_one_and_copies_buffers(with_buffers, as_tensor):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 5)] + ([torch.nn.BatchNorm1d(5)] if with_buffers else [])
    model = torch.nn.Sequential(*layers)
    ema = EMA(model, 0.99)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            b.add_(1)
    weight = ema.weight(5)                                          # the ramp: 1 - (1 + 5) / (10 + 5)
    assert weight == pytest.approx(1 - 6 / 15)
    ema.update(model, torch.tensor(weight) if as_tensor else weight)
    for old, new, live in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(new, old + weight * (live - old))
    for new, live in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(new, live)


def test_the_checkpoint_writer_saves_what_there_was_when_asked_though_training_goes_on(tmp_path):
    weights, history = torch.arange(6.0, device=DEVICE), [0.5]
    with CheckpointWriter() as writer:
        writer.save(dict(weights=weights, history=history, step=3), tmp_path / "first.pt")
        weights.add_(100)                                            # the next steps change them in place
        history.append(0.75)
        writer.save(dict(weights=weights, history=history, step=4), tmp_path / "second.pt")
    first, second = (torch.load(tmp_path / name, weights_only=False) for name in ("first.pt", "second.pt"))
    assert torch.equal(first["weights"], torch.arange(6.0)) and first["history"] == [0.5] and first["step"] == 3
    assert torch.equal(second["weights"], torch.arange(6.0) + 100) and second["history"] == [0.5, 0.75]
    assert first["weights"].device.type == "cpu" and not list(tmp_path.glob("*.tmp"))


def test_a_checkpointed_state_dict_keeps_its_type_and_version_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(DEVICE)
    with CheckpointWriter() as writer:
        writer.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert type(saved) is type(model.state_dict()) and saved._metadata == model.state_dict()._metadata
    assert all(torch.equal(saved[name], tensor.cpu()) for name, tensor in model.state_dict().items())


def test_the_checkpoint_writer_thread_ends_with_its_block(tmp_path):
    before = set(threading.enumerate())
    with CheckpointWriter() as writer:
        writer.save({"step": 1}, tmp_path / "checkpoint.pt")
        started = set(threading.enumerate()) - before
    assert started and not any(thread.is_alive() for thread in started)


def test_a_failed_checkpoint_write_is_raised_not_lost(tmp_path):
    with pytest.raises(RuntimeError, match="no such folder does not exist"):   # torch.save's own error
        with CheckpointWriter() as writer:
            writer.save({"step": 1}, tmp_path / "no such folder" / "checkpoint.pt")


@settings(deadline=None)
@given(value=st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.sampled_from([math.inf, -math.inf, math.nan])),
       low=st.sampled_from([-1, 0, 1]), width=st.sampled_from([0.5, 2, math.inf]),
       open_low=st.booleans(), open_high=st.booleans())
def test_a_bounded_option_takes_exactly_the_finite_numbers_of_its_range(value, low, width, open_low, open_high):
    high = low + width
    parse = bounded(float, low, high, open_low=open_low, open_high=open_high)
    inside = (math.isfinite(value) and (low < value if open_low else low <= value)
              and (value < high if open_high else value <= high))
    if inside:
        assert parse(str(value)) == float(value)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(str(value))


@pytest.mark.parametrize("script, args, message", [
    (train_cifar, ["--epochs", "0"], "--epochs: 0: must be at least 1"),
    (train_cifar, ["--batch-size", "-2"], "--batch-size: -2: must be at least 1"),
    (train_cifar, ["--limit", "-5"], "--limit: -5: must be at least 1"),
    (train_cifar, ["--lr", "0"], "--lr: 0: must be above 0"),
    (train_cifar, ["--clip", "-1"], "--clip: -1: must be above 0"),
    (train_cifar, ["--sam-rho", "nan"], "--sam-rho: nan: must be above 0"),
    (train_cifar, ["--warmup-epochs", "-1"], "--warmup-epochs: -1: must be at least 0"),
    (train_cifar, ["--crop-pad", "-1"], "--crop-pad: -1: must be at least 0"),
    (train_cifar, ["--weight-decay", "-0.1"], "--weight-decay: -0.1: must be at least 0"),
    (train_cifar, ["--ema", "1"], "--ema: 1: must be in [0, 1)"),
    (train_cifar, ["--label-smoothing", "1.5"], "--label-smoothing: 1.5: must be in [0, 1)"),
    (train_cifar, ["--drop-path", "1.0"], "--drop-path: 1.0: must be in [0, 1)"),
    (train_cifar, ["--erase-p", "2"], "--erase-p: 2: must be in [0, 1]"),
    (train_cifar, ["--mix", "-0.1"], "--mix: -0.1: must be in [0, 1]"),
    (train_cifar, ["--sam-epochs", "-1"], "--sam-epochs: -1: must be at least 0"),
    (train_cifar, ["--sam-epochs", "301"], "--sam-epochs must be at most --epochs"),
    (train_cifar, ["--clean-epochs", "-1"], "--clean-epochs: -1: must be at least 0"),
    (train_cifar, ["--epochs", "10", "--clean-epochs", "11"], "--clean-epochs must be at most --epochs"),
    (train_cifar, ["--epochs", "2.5"], "--epochs: invalid int value"),
    (train_cifar, ["--optimizer", "lamb"], "--optimizer: invalid choice"),
    (train_llava, ["--batch-size", "0"], "--batch-size: 0: must be at least 1"),
    (train_llava, ["--layers", "0"], "--layers: 0: must be at least 1"),
    (train_llava, ["--d-model", "0"], "--d-model: 0: must be at least 1"),
    (train_llava, ["--stage0-steps", "0"], "--stage0-steps: 0: must be at least 1"),
    (train_llava, ["--stage1-epochs", "-1"], "--stage1-epochs: -1: must be above 0"),
    (train_llava, ["--lr", "-1"], "--lr: -1: must be above 0"),
    (train_llava, ["--limit", "0"], "--limit: 0: must be at least 1"),
])
def test_an_option_out_of_range_is_a_usage_message_before_any_work(script, args, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.parse_args(args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("script", [train_cifar, train_llava])
def test_an_output_folder_that_cannot_be_made_is_a_message_before_any_work(script, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        script.main(["--out", str(tmp_path / "a file" / "out")])   # the defaults would train on CIFAR-100: not reached
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "cannot create the output folder" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--cuda-graph", "--compile"])
def test_gpu_only_options_on_a_cpu_are_a_clear_error(tmp_path, flag):
    result = run_script(*SMOKE, "--epochs", "1", flag, "--out", str(tmp_path))
    assert result.returncode == 2 and f"{flag} needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@needs_cuda
def test_a_graphed_step_replays_the_eager_step_and_reads_its_tensors_at_each_replay():
    # plain gradient descent with a tensor learning rate, and an EMA with a tensor weight: small numerical differences
    # stay small (Adam would divide them by the square root of its second moment), so the runs must agree closely
    torch.manual_seed(0)
    eager_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).cuda()
    graph_model = copy.deepcopy(eager_model)
    lr = torch.tensor(0.1, device="cuda")
    ema_weight = torch.zeros((), device="cuda")
    runs = []
    for model, wrap in ((eager_model, lambda f: f), (graph_model, lambda f: GraphedStep(f, warmup=3))):
        ema = EMA(model, 0.9)

        def step(x, y, ema_weight, model=model, ema=ema):
            loss = torch.nn.functional.mse_loss(model(x), y)
            params = list(model.parameters())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
            ema.update(model, ema_weight)
            return (loss.detach(),)
        runs.append((wrap(step), ema))
    generator = torch.Generator(device="cuda").manual_seed(1)
    for i in range(12):
        x, y = (torch.randn(32, n, device="cuda", generator=generator) for n in (8, 4))
        ema_weight.fill_(runs[0][1].weight(i + 1))
        if i == 8:
            lr.fill_(0.02)                                           # a new learning rate, as the scheduler sets it
        eager_loss, graph_loss = (step(x, y, ema_weight)[0].item() for step, _ in runs)
        assert graph_loss == pytest.approx(eager_loss, rel=1e-5)
    (_, eager_ema), (graphed, graph_ema) = runs
    assert graphed.graph is not None                                 # the last steps were replays of the graph
    for a, b in zip([*eager_model.parameters(), *eager_ema.model.parameters()],
                    [*graph_model.parameters(), *graph_ema.model.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("optimizer, compile, sam",      # SAM: its own graph, captured after 11 more eager steps
                         [("sgd", "--no-compile", "0"), ("adamw", "--no-compile", "0"), ("sgd", "--compile", "0"),
                          ("sgd", "--compile", "6")])
def test_smoke_run_with_cuda_graph(tmp_path, optimizer, compile, sam):
    metrics = train_cifar.main(["--dataset", "synthetic", *TINY, "--epochs", "6", "--cuda-graph", "--device", "cuda",
                                "--optimizer", optimizer, compile, "--sam-epochs", sam,
                                "--out", str(tmp_path)])                                       # 18 steps: 11 eager,
    losses = [h["train_loss"] for h in metrics["history"]]                                     # then replays
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and 0.0 <= metrics["test_acc"] <= 1.0
    assert losses[-1] < losses[0] and metrics["optimizer"] == optimizer
    assert metrics["compile"] == (compile == "--compile")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("graph", ["--cuda-graph", "--no-cuda-graph"])     # all-reduce in the graph, or DDP
def test_two_gpus_train_together(tmp_path, graph):
    result = run_script("--dataset", "synthetic", *TINY, "--batch-size", "16", "--epochs", "8", graph,
                        "--out", str(tmp_path), processes=2)        # 3 steps an epoch: 11 eager, then replays
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] and metrics["world_size"] == 2 and metrics["cuda_graph"] == (graph == "--cuda-graph")
    assert metrics["compile"]                                        # the default on a GPU
    assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])
