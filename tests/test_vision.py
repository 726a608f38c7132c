"""MambaVision (vision.py): shapes and gradients on both image formats, the mixer against a hand-computed case, and the
paper's layout of the stages."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mini_mamba.vision import SIZES, ViT, Attention, MambaVisionMixer, TokenStage, VisionConfig, build_model
from tests.conftest import DEVICE, eager_and_compiled


@pytest.mark.parametrize("channels, size, classes", [(3, 32, 100), (1, 28, 10)])
def test_forward_and_backward_on_cifar_and_fashion_mnist_batches(channels, size, classes):
    torch.manual_seed(0)
    model = build_model("tiny", channels, classes).to(DEVICE)
    images = torch.randn(4, channels, size, size, device=DEVICE)
    logits = model(images)
    assert logits.shape == (4, classes) and torch.isfinite(logits).all()
    assert model.features(images).shape == (4, SIZES["tiny"]["dims"][-1], 4, 4)      # 32→4 and 28→4, no padding
    F.cross_entropy(logits, torch.arange(4, device=DEVICE) % classes).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("channels, size, classes", [(3, 32, 100), (1, 28, 10)])
def test_the_vit_runs_on_both_image_formats_at_one_resolution_throughout(channels, size, classes):
    torch.manual_seed(0)
    model = build_model("vit-tiny", channels, classes, image_size=size).to(DEVICE)
    assert isinstance(model, ViT) and all(isinstance(block.mixer, Attention) for block in model.blocks)
    images = torch.randn(4, channels, size, size, device=DEVICE)
    logits = model(images)
    assert logits.shape == (4, classes) and torch.isfinite(logits).all()
    assert model.features(images).shape == (4, SIZES["vit-tiny"]["dims"][0], size // 4, size // 4)   # 4 px patches
    F.cross_entropy(logits, torch.arange(4, device=DEVICE) % classes).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("vit, mambavision", [("vit-tiny", "tiny"), ("vit-small", "small")])
def test_each_vit_has_within_10_percent_of_its_mambavisions_parameters(vit, mambavision):
    count = lambda size: sum(p.numel() for p in build_model(size, 3, 100).parameters())
    assert abs(count(vit) / count(mambavision) - 1) <= 0.10


def test_mixer_matches_a_hand_computed_case():
    """dim 2 -> one SSM channel x and one gate channel z, d_state 1. With identity projections, an identity conv for x,
    an all-ones conv for z, Δ = softplus(log(e - 1)) = 1, A = -1, B = C = u, D = 0:
        u_t = silu(x_t),  h_t = e⁻¹·h_{t-1} + u_t·u_t,  y_t = u_t·h_t,  out_t = (y_t, silu(z_{t-1} + z_t + z_{t+1}))."""
    mixer = MambaVisionMixer(dim=2, d_state=1, d_conv=3, expand=1)
    with torch.no_grad():
        mixer.in_proj.weight.copy_(torch.eye(2))
        mixer.out_proj.weight.copy_(torch.eye(2))
        mixer.conv1d_x.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]]]))
        mixer.conv1d_z.weight.copy_(torch.ones(1, 1, 3))
        mixer.ssm.x_proj.weight.copy_(torch.tensor([[0.0], [1.0], [1.0]]))      # rows: dt, B, C
        mixer.ssm.dt_proj.weight.fill_(0.0)
        mixer.ssm.dt_proj.bias.fill_(math.log(math.e - 1))
        mixer.ssm.A_log.fill_(0.0)
        mixer.ssm.D.fill_(0.0)
    x, z = [0.5, -1.0, 2.0], [1.0, 0.25, -0.5]
    out = mixer(torch.tensor([list(pair) for pair in zip(x, z)])[None])[0]       # (3, 2)

    silu = lambda v: v / (1 + math.exp(-v))
    h, expected = 0.0, []
    for t in range(3):
        u = silu(x[t])
        h = math.exp(-1) * h + u * u
        z_sum = sum(z[s] for s in (t - 1, t, t + 1) if 0 <= s < 3)
        expected.append([u * h, silu(z_sum)])
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth, n_mixers", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)])
def test_token_stages_put_mixers_first_and_attention_last(depth, n_mixers):
    stage = TokenStage(64, depth, VisionConfig(), [0.0] * depth)
    kinds = [type(block.mixer) for block in stage.blocks]
    assert kinds == [MambaVisionMixer] * n_mixers + [Attention] * (depth - n_mixers)


def test_drop_path_and_layer_scale_follow_the_config():
    model = build_model("small", 3, 100)
    drops = [block.drop for stage in model.stages for block in (stage.blocks if isinstance(stage, TokenStage)
                                                                 else stage)]
    assert drops[0] == 0.0 and drops[-1] == pytest.approx(SIZES["small"]["drop_path"])
    assert drops == sorted(drops)
    assert model.stages[2].blocks[0].gamma1.detach().eq(VisionConfig.layer_scale).all()


def test_eval_mode_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = build_model("tiny", 1, 10).eval()
    images = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(images)[1:], model(images[1:]), rtol=1e-4, atol=1e-5)


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_model("huge", 3, 10)


def test_readme_states_the_parameter_counts_of_each_size():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for size in SIZES:
        counts = [sum(p.numel() for p in build_model(size, c, k, image_size=px).parameters()) / 1e6
                  for c, k, px in ((3, 100, 32), (1, 10, 28))]
        row = next(line for line in readme.splitlines() if line.startswith(f"| {size} "))
        assert [f"{n:.2f}M" for n in counts] == row.rstrip(" |").split(" | ")[-2:], row


@pytest.mark.skipif(DEVICE.type != "cuda", reason="train_cifar.py --compile is for CUDA GPUs")
def test_the_compiled_model_computes_what_the_eager_one_does(monkeypatch):
    """torch.compile (train_cifar.py --compile) fuses kernels and reorders sums, so agreement is to float32 rounding,
    measured per tensor relative to its norm: the logits and every gradient. Drop-path is off (its random
    draws differ between the two) and so is TF32 (its 10-bit products would dominate the comparison). Some gradients
    are exactly zero in exact arithmetic (a bias of the last stage adds a per-channel constant, which the train-mode
    BatchNorm before the head subtracts again), so both sides hold rounding noise there: the floor for those is 1e-7
    of the norm of all the gradients together."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model("tiny", 1, 10, drop_path=0.0).to(DEVICE)
    images = torch.randn(16, 1, 28, 28, device=DEVICE, requires_grad=True)
    labels = torch.arange(16, device=DEVICE) % 10
    eager, compiled = eager_and_compiled(model, images, lambda logits: F.cross_entropy(logits, labels))
    floor = 1e-7 * torch.cat([g.flatten() for name, g in eager.items() if name != "out"]).norm().item()
    for name in eager:
        error = (compiled[name] - eager[name]).norm().item()
        assert error <= 1e-4 * eager[name].norm().item() + floor, name
