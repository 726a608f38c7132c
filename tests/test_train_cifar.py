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
from mini_mamba.training import EMA, CheckpointWriter, GraphedStep, average_gradients, bounded, broadcast_
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--limit", "96", "--batch-size", "32"]
SMOKE = ["--dataset", "synthetic", *TINY, "--device", "cpu"]      # on the CPU: bit-exact, for resume and NaN


def test_smoke_run_on_synthetic_writes_the_contracted_files(tmp_path):
    metrics = train_cifar.main(["--dataset", "synthetic", *TINY, "--epochs", "1", "--device", DEVICE.type,
                                "--seed", "3", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("dataset", "epochs", "test_acc", "params", "train_time_s", "images_per_s"):
        assert key in written
    assert written["complete"] and written["dataset"] == "synthetic" and 0.0 <= written["test_acc"] <= 1.0
    assert written["test_acc"] == metrics["test_acc"] == written["history"][-1]["test_acc"] and written["params"] > 0
    assert written["seed"] == 3                                     # the runs' accuracy moves with it: recorded
    assert written["cuda_graph"] == written["compile"] == (DEVICE.type == "cuda")     # on by default on a GPU only
    assert 0.0 <= written["test_acc_no_flip"] <= 1.0 and 0.0 <= written["test_acc_raw"] <= 1.0
    assert written["total_time_s"] > written["train_time_s"] > 0    # the final evaluation counts in the total
    assert (written["peak_memory_bytes"] > 0) if DEVICE.type == "cuda" else written["peak_memory_bytes"] is None
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert saved["size"] == "tiny" and len(saved["classes"]) == 10


def test_smoke_run_of_the_vit_writes_a_checkpoint_that_rebuilds_it(tmp_path):
    metrics = train_cifar.main([*SMOKE[:2], "--model", "vit-tiny", *TINY[2:], "--epochs", "1", "--device", "cpu",
                                "--out", str(tmp_path)])
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert metrics["model"] == "vit-tiny" and saved["config"]["arch"] == "vit"
    vision = train_llava.load_vision(tmp_path / "model.pt", torch.device("cpu"))["model"]   # what LLaVA reads
    assert type(vision).__name__ == "ViT" and vision.config.image_size == 32


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_smoke_run_on_fashion_mnist(tmp_path):
    metrics = train_cifar.main(["--dataset", "fashion-mnist", *TINY, "--epochs", "1", "--device", DEVICE.type,
                                "--out", str(tmp_path)])
    assert metrics["dataset"] == "fashion-mnist" and metrics["history"][0]["epoch"] == 1


def test_the_test_time_flip_predicts_from_the_logits_of_the_image_plus_those_of_its_mirror_image(monkeypatch):
    monkeypatch.setattr(train_cifar, "EVAL_BATCH", 16)              # several batches
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
    evaluate = lambda flip: train_cifar.evaluate(model, images, labels, mean, std, 0, 1, off, flip)
    assert evaluate(True) == 1.0
    assert evaluate(False) == pytest.approx((plain.argmax(-1) == labels).float().mean().item())


def interrupt_at_call(monkeypatch, function: str, call: int):
    """Deliver a real SIGINT (Ctrl-C) to this process at the given call of data.<function> (augment: each training
    step; eval_batches: each evaluation)."""
    calls = {"n": 0}
    original = getattr(data, function)
    def then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(data, function, then_interrupt)


@pytest.mark.parametrize("function, call, epoch, step_in_epoch", [
    ("augment", 2, 0, 2),          # in the middle of epoch 1 of 2 (3 steps an epoch)
    ("augment", 5, 1, 2),          # in the middle of epoch 2
    ("eval_batches", 1, 0, 3),     # in the evaluation after epoch 1: its steps are kept
    ("eval_batches", 3, 2, 0),     # in the final evaluation: every epoch is kept
])
def test_resume_after_an_interruption_gives_the_run_of_an_uninterrupted_one(tmp_path, monkeypatch, function, call,
                                                                           epoch, step_in_epoch):
    run = SMOKE + ["--epochs", "2", "--seed", "3"]
    straight = train_cifar.main(run + ["--out", str(tmp_path / "straight")])

    interrupt_at_call(monkeypatch, function, call)
    with pytest.raises(SystemExit) as stopped:
        train_cifar.main(run + ["--out", str(tmp_path / "resumed")])
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert (saved["state"]["epoch"], saved["state"]["step_in_epoch"]) == (epoch, step_in_epoch)
    monkeypatch.undo()
    resumed = train_cifar.main(["--resume", "--out", str(tmp_path / "resumed")])   # device, recipe: the checkpoint's

    for key in ("test_acc", "test_acc_raw", "test_acc_no_flip"):
        assert resumed[key] == straight[key]
    for mine, theirs in zip(resumed["history"], straight["history"]):
        assert {k: v for k, v in mine.items() if k != "images_per_s"} == pytest.approx(
            {k: v for k, v in theirs.items() if k != "images_per_s"})          # whole epochs, though interrupted
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("straight", "resumed")]
    for key in ("model", "ema"):
        assert weights[0][key].keys() == weights[1][key].keys()
        for name in weights[0][key]:
            assert torch.equal(weights[0][key][name], weights[1][key][name]), f"{key}.{name} differs after resume"


def resume_with_saved_args_edited(tmp_path, monkeypatch, options: list[str], edit) -> dict:
    """Interrupt a run with these options at its second step, apply edit to the args its checkpoint saved (as a run
    from another machine or an older version would have saved them), then --resume it; returns its metrics."""
    interrupt_at_call(monkeypatch, "augment", 2)
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


def test_a_checkpoint_of_an_older_version_with_options_that_are_gone_is_a_clear_error(tmp_path, monkeypatch,
                                                                                      capsys):
    with pytest.raises(SystemExit) as stopped:
        resume_with_saved_args_edited(tmp_path, monkeypatch, [], lambda args: args.update(sam_epochs=40, mix=0.5))
    assert stopped.value.code == 2
    assert "older train_cifar.py with options that no longer exist (mix, sam_epochs)" in capsys.readouterr().err


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
    result = run_script(*SMOKE, "--batch-size", "16", "--epochs", "2", "--out", str(tmp_path), processes=2)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] and metrics["world_size"] == 2 and metrics["batch_size"] == 32   # 16 per process
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
    (train_cifar, ["--lr", "nan"], "--lr: nan: must be above 0"),
    (train_cifar, ["--warmup-epochs", "-1"], "--warmup-epochs: -1: must be at least 0"),
    (train_cifar, ["--crop-pad", "-1"], "--crop-pad: -1: must be at least 0"),
    (train_cifar, ["--weight-decay", "-0.1"], "--weight-decay: -0.1: must be at least 0"),
    (train_cifar, ["--ema", "1"], "--ema: 1: must be in [0, 1)"),
    (train_cifar, ["--label-smoothing", "1.5"], "--label-smoothing: 1.5: must be in [0, 1)"),
    (train_cifar, ["--drop-path", "1.0"], "--drop-path: 1.0: must be in [0, 1)"),
    (train_cifar, ["--erase-p", "2"], "--erase-p: 2: must be in [0, 1]"),
    (train_cifar, ["--epochs", "2.5"], "--epochs: invalid int value"),
    (train_cifar, ["--model", "huge"], "--model: invalid choice"),
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
@pytest.mark.parametrize("compile", ["--no-compile", "--compile"])
def test_smoke_run_with_cuda_graph(tmp_path, compile):
    metrics = train_cifar.main(["--dataset", "synthetic", *TINY, "--epochs", "6", "--cuda-graph", "--device", "cuda",
                                compile, "--out", str(tmp_path)])                   # 18 steps: 11 eager, then replays
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and 0.0 <= metrics["test_acc"] <= 1.0
    assert losses[-1] < losses[0] and metrics["compile"] == (compile == "--compile")


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
