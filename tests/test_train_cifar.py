"""train_cifar.py's command-line contract: smoke runs on synthetic data and on Fashion-MNIST, exact resume after an
interruption, a non-finite loss stopping the run with the last good checkpoint kept, and clear errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_cifar
from mini_mamba import data
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--limit", "96", "--batch-size", "32"]
SMOKE = ["--dataset", "synthetic", *TINY, "--device", "cpu"]        # on the CPU: bit-exact, for resume and NaN


def test_smoke_run_on_synthetic_writes_the_contracted_files(tmp_path):
    metrics = train_cifar.main(["--dataset", "synthetic", *TINY, "--epochs", "1", "--device", DEVICE.type,
                                "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("dataset", "epochs", "test_acc", "params", "train_time_s", "images_per_s"):
        assert key in written
    assert written["complete"] and written["dataset"] == "synthetic" and 0.0 <= written["test_acc"] <= 1.0
    assert written["test_acc"] == metrics["test_acc"] and written["params"] > 0
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
    evaluate = lambda flip: train_cifar.evaluate(model, images, labels, mean, std, 16, 0, 1, off, flip)
    assert evaluate(True) == 1.0
    assert evaluate(False) == pytest.approx((plain.argmax(-1) == labels).float().mean().item())


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


def test_resume_after_an_interruption_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    run = SMOKE + ["--epochs", "2", "--seed", "3", "--mix", "0.5"]     # CutMix draws are resumed exactly too
    train_cifar.main(run + ["--out", str(tmp_path / "straight")])

    interrupt_at_step(monkeypatch, 2)                                # mid-epoch 1 (3 steps per epoch)
    with pytest.raises(SystemExit) as stopped:
        train_cifar.main(run + ["--out", str(tmp_path / "resumed")])
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == 0 and 0 < saved["state"]["step_in_epoch"] < 3
    monkeypatch.undo()
    train_cifar.main(["--resume", "--out", str(tmp_path / "resumed")])      # device and recipe from the checkpoint

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), f"{key}.{name} differs after resume"


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


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_cifar.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_missing_cifar_is_a_message_not_a_traceback(tmp_path):
    result = run_script("--dataset", "cifar100", "--data-dir", str(tmp_path), "--device", "cpu", "--out",
                        str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: no cifar-100-python.tar.gz" in result.stderr and "Traceback" not in result.stderr


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = run_script("--resume", "--out", str(tmp_path))
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr
