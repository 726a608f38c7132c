"""Build and train the tiny LLaVA (mini_mamba/llava.py) on top of a MambaVision trained by train_cifar.py, then
evaluate it on the test split.

    python train_cifar.py --dataset fashion-mnist --out runs/cifar      # the vision encoder first
    python train_llava.py --vision-ckpt runs/cifar/model.pt             # three stages + evaluation -> runs/llava

Stages (LLaVA section 4.2, with a stage 0 of our own because our language model starts from scratch):

    stage   data                                   vision    projector   language model
    0       the seen templates as text, no image   frozen    —           trained
    1       captions "a photo of a <class> ."      frozen    trained     frozen
    2       all question types (seen paraphrases)  frozen    trained     trained

In stages 0 and 2 half of the questions have their words scrambled (instruct.py says why).

The vision encoder is frozen, so its features are computed once for every image and reused by all stages. Evaluation
asks every test image each question type, with seen and held-out paraphrases, and repeats the questions with the image
features zeroed and shuffled across images (the blind baselines). Writes OUT/metrics.json and OUT/stage{0,1,2}.pt.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from mini_mamba import data
from mini_mamba.instruct import SCRAMBLE, TEMPLATES, Labels, Tokenizer
from mini_mamba.llava import TinyLLaVA, build_batch, show_batch
from mini_mamba.mamba import MambaConfig, MambaLM
from mini_mamba.training import (StopRequest, bounded, fail, load_saved, output_folder, param_groups, save_atomic,
                                 setup, warmup_cosine)
from mini_mamba.vision import VisionConfig, make_vision


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-ckpt", default="runs/cifar/model.pt", help="model.pt written by train_cifar.py")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the vision model's dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--d-model", type=bounded(int, 1), default=256, help="the language model's width")
    p.add_argument("--layers", type=bounded(int, 1), default=4, help="the language model's Mamba blocks")
    p.add_argument("--batch-size", type=bounded(int, 1), default=256)
    p.add_argument("--stage0-steps", type=bounded(int, 1), default=500)
    p.add_argument("--stage1-epochs", type=bounded(float, 0, open_low=True), default=1.0)
    p.add_argument("--stage2-epochs", type=bounded(float, 0, open_low=True), default=3.0)
    p.add_argument("--lr", type=bounded(float, 0, open_low=True), default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=bounded(int, 1), default=None,
                   help="use only the first N training and test examples; stage 0, which has no images, is "
                        "shortened in the same proportion (stages 1 and 2 are epochs over the N)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--out", default="runs/llava")
    return p.parse_args(argv)


def load_vision(path: Path, device: torch.device) -> dict:
    saved = load_saved(path, "a model.pt of train_cifar.py", ("model", "config", "classes", "mean", "std"),
                       f"no vision checkpoint at {path}: train one first, e.g. `python train_cifar.py --dataset "
                       f"fashion-mnist --out {path.parent}`, or pass --vision-ckpt")
    vision = make_vision(VisionConfig(**saved["config"]))
    vision.load_state_dict(saved["model"])
    return dict(saved, model=vision.to(device))


@torch.no_grad()
def image_features(model: TinyLLaVA, images: torch.Tensor, mean, std, autocast, batch_size: int = 1024):
    """The frozen encoder's features (n, h·w, d_vision) for uint8 images (n, c, H, W), in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        with autocast:
            out.append(model.encode_images(data.normalize(images[start:start + batch_size], mean, std)).float())
    return torch.cat(out)


def run_stage(model: TinyLLaVA, trainable: list[torch.nn.Module], steps: int, make_batch, lr: float, autocast,
              title: str = "", stop: StopRequest | None = None) -> tuple[float, int]:
    """Train only the `trainable` modules for `steps` AdamW steps (warmup + cosine) on make_batch(step) ->
    (input_ids, labels, image features or None); everything else stays frozen. Returns the last loss and the number
    of steps taken (fewer than `steps` after a stop request)."""
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, steps // 20))
    model.train()
    device = next(model.parameters()).device
    bar = tqdm(range(steps), desc=title, dynamic_ncols=True)
    for step in bar:
        input_ids, labels, features = make_batch(step)
        with autocast:
            loss = model(input_ids.to(device), features, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if stop is not None and stop.requested:
            break
    bar.close()
    return loss.item(), step + 1


def load_task(args: argparse.Namespace, device: torch.device):
    """The frozen vision model, the dataset it was trained on (on the device), and the questions' labels. With
    --limit, args.stage0_steps is shortened here in proportion to the share of the training set kept."""
    vision = load_vision(Path(args.vision_ckpt), device)
    name = args.dataset or vision.get("dataset")
    if name is None:
        fail(f"{args.vision_ckpt} does not say which dataset it was trained on: pass --dataset")
    try:
        full = data.load_dataset(name, args.data_dir)
    except data.DataError as error:
        fail(str(error))
    dataset = full.limit(args.limit).to(device)
    if args.limit:                                           # the smaller share of the data, the shorter stage 0
        args.stage0_steps = max(1, round(args.stage0_steps * len(dataset.train_images) / len(full.train_images)))
    if dataset.classes != vision["classes"]:
        fail(f"the vision checkpoint was trained on other classes than {name}'s; pass the matching --dataset")
    coarse_of = None
    if dataset.train_coarse is not None:                     # each class's superclass, read off the training labels
        pairs = dict(zip(dataset.train_labels.tolist(), dataset.train_coarse.tolist()))
        coarse_of = [pairs.get(c, 0) for c in range(len(dataset.classes))]
    return vision, name, dataset, Labels(dataset.classes, dataset.coarse_classes, coarse_of)


def train_stages(model: TinyLLaVA, tokenizer: Tokenizer, labels: Labels, train_labels: list[int],
                 train_features: torch.Tensor, args: argparse.Namespace, out: Path, autocast) -> tuple[dict, dict]:
    """The three stages (module docstring), each saved to OUT/stage{k}.pt; returns their times in seconds and the
    steps each took."""
    n_train, n_image, device = len(train_labels), train_features.shape[1], train_features.device
    kinds, example_rng = labels.kinds, random.Random(args.seed)

    def stage0_batch(_):                          # text only: questions and answers about no image at all
        examples = [labels.example(example_rng.choice(kinds + ["caption"]), example_rng.randrange(len(labels.classes)),
                                   example_rng, scramble=SCRAMBLE) for _ in range(args.batch_size)]
        return build_batch(tokenizer, examples, 0) + (None,)

    def image_batches(kind_of, epochs: float, scramble: float):
        order = torch.cat([torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed + e))
                           for e in range(int(epochs) + 1)])
        steps = max(1, int(epochs * n_train) // args.batch_size)

        def batch(step):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            examples = [labels.example(kind_of(), train_labels[i], example_rng, scramble=scramble)
                        for i in idx.tolist()]
            return build_batch(tokenizer, examples, n_image) + (train_features[idx.to(device)],)
        return steps, batch

    example = build_batch(tokenizer, [labels.example("yesno", train_labels[0], random.Random(1))], 2)
    print("what stage 2 trains on (2 image tokens shown instead of", n_image, "):")
    print(show_batch(tokenizer, *example))
    stage_times, stage_steps = {}, {}
    steps1, batch1 = image_batches(lambda: "caption", args.stage1_epochs, 0.0)
    steps2, batch2 = image_batches(lambda: example_rng.choice(kinds), args.stage2_epochs, SCRAMBLE)
    stages = [("stage 0: text-only pretraining", [model.lm], args.stage0_steps, stage0_batch),
              ("stage 1: alignment (projector only)", [model.projector], steps1, batch1),
              ("stage 2: instruction tuning (projector + LM)", [model.projector, model.lm], steps2, batch2)]
    with StopRequest() as stop:
        for k, (title, trainable, steps, make_batch) in enumerate(stages):
            t0 = time.perf_counter()
            loss, done = run_stage(model, trainable, steps, make_batch, args.lr, autocast, title, stop)
            save_atomic(dict(projector=model.projector.state_dict(), lm=model.lm.state_dict(),
                             lm_config=model.lm.config, vocab=tokenizer.vocab, stage=k, complete=not stop.requested),
                        out / f"stage{k}.pt")
            stage_times[f"stage{k}"], stage_steps[f"stage{k}"] = time.perf_counter() - t0, done
            print(f"{title}: {done} of {steps} steps, last loss {loss:.3f}, {stage_times[f'stage{k}']:.0f} s; "
                  f"saved {out / f'stage{k}.pt'}")
            if stop.requested:
                fail(f"interrupted during {title}; its weights so far are in {out / f'stage{k}.pt'}", code=130)
    return stage_times, stage_steps


def evaluate_llava(model: TinyLLaVA, tokenizer: Tokenizer, labels: Labels, test_labels: list[int],
                   test_features: torch.Tensor, seed: int, autocast) -> dict:
    """Exact match per question type and paraphrase set — with the image features, zeroed, and shuffled across
    images, on the same questions — and three sample conversations."""
    model.eval()

    def answered(features: torch.Tensor) -> dict[str, tuple[bool, list, list[str]]]:
        """The same questions of each type and paraphrase set, answered with these features: key ("class",
        "class_heldout", ...) -> (heldout, examples, the model's answers)."""
        sets = {}
        for kind in labels.kinds:
            for heldout in (False, True):
                rng = random.Random(f"{seed}-{kind}-{heldout}")
                examples = [labels.example(kind, y, rng, heldout) for y in test_labels]
                sets[f"{kind}_heldout" if heldout else kind] = (heldout, examples,
                                                                model.answer(tokenizer, examples, features))
        return sets

    def accuracy(sets: dict) -> dict[str, float]:
        """Exact match per type and paraphrase set."""
        return {key: sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)
                for key, (_, examples, answers) in sets.items()}

    shuffled = test_features[torch.randperm(len(test_features), generator=torch.Generator().manual_seed(0))]
    with autocast:
        with_image = answered(test_features)
        metrics = dict(accuracy=accuracy(with_image),
                       by_template=[row for heldout, examples, answers in with_image.values()   # per paraphrase
                                    for row in template_report(examples, answers, heldout)],
                       blind_accuracy=accuracy(answered(torch.zeros_like(test_features))),
                       shuffled_accuracy=accuracy(answered(shuffled)))
    samples = []
    for i in range(min(3, len(test_labels))):
        rng = random.Random(i)
        asked = [(heldout, labels.example(kind, test_labels[i], rng, heldout)) for kind in labels.kinds
                 for heldout in (False, True)]
        questions = [q for _, q in asked]
        with autocast:
            answers = model.answer(tokenizer, questions, test_features[i:i + 1].expand(len(questions), -1, -1))
        samples.append(dict(label=labels.classes[test_labels[i]],
                            turns=[dict(question=q.question, answer=a, expected=q.answer, heldout=heldout)
                                   for (heldout, q), a in zip(asked, answers)]))
    return dict(metrics, samples=samples)


def template_report(examples: list, answers: list[str], heldout: bool) -> list[dict]:
    """Exact match per paraphrase, and the three commonest wrong answers to it: what the model took the question for
    when it failed (a "yes" to a class question: it read a yes/no question)."""
    rows = []
    for template in dict.fromkeys(e.template for e in examples):
        pairs = [(a, e.answer) for a, e in zip(answers, examples) if e.template == template]
        wrong = Counter(a for a, expected in pairs if a != expected).most_common(3)
        rows.append(dict(kind=examples[0].kind, heldout=heldout, template=template, n=len(pairs),
                         accuracy=sum(a == expected for a, expected in pairs) / len(pairs), wrong=dict(wrong)))
    return rows


def print_report(metrics: dict, kinds: list[str], out: Path) -> None:
    for sample in metrics["samples"]:
        print(f"\n[test image of a {sample['label']}]")
        for turn in sample["turns"]:
            who = "user (held-out paraphrase)" if turn["heldout"] else "user"
            print(f"  {who}: {turn['question']}\n  assistant: {turn['answer']}")
    print("\nexact match per paraphrase (* held out), with the commonest wrong answers:")
    for row in metrics["by_template"]:
        wrong = ", ".join(f"{a!r} {n}" for a, n in row["wrong"].items())
        print(f"  {row['kind']:10s} {'*' if row['heldout'] else ' '} {row['accuracy']:.4f}  {row['template']:45s} "
              f"{wrong}")
    print("\nexact match, seen / held-out paraphrases (blind: image features zeroed / shuffled):")
    for kind in kinds:
        a, b, s = metrics["accuracy"], metrics["blind_accuracy"], metrics["shuffled_accuracy"]
        print(f"  {kind:10s} {a[kind]:.4f} / {a[kind + '_heldout']:.4f}   (blind {b[kind]:.4f} / "
              f"{s[kind]:.4f})")
    print(f"encoder accuracy {metrics['encoder_acc']:.4f}; pipeline {metrics['pipeline_time_s']:.0f} s; "
          f"wrote {out / 'metrics.json'}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device, _, _ = setup(args.device)
    out = output_folder(args.out)                                # before any work: a clear error if it cannot be
    vision, name, dataset, labels = load_task(args, device)
    tokenizer = Tokenizer(labels.words())
    torch.manual_seed(args.seed)
    lm = MambaLM(MambaConfig(d_model=args.d_model, n_layers=args.layers, vocab_size=len(tokenizer)))
    model = TinyLLaVA(vision["model"], lm, tokenizer.image_id).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    mean, std = vision["mean"].to(device), vision["std"].to(device)
    train_features = image_features(model, dataset.train_images, mean, std, autocast)   # (n, h·w, d_vision)
    test_features = image_features(model, dataset.test_images, mean, std, autocast)
    with torch.no_grad():
        logits = model.vision.head(test_features.mean(1))
    encoder_acc = (logits.argmax(-1) == dataset.test_labels).float().mean().item()
    print(f"tiny LLaVA on {name}: {len(tokenizer)}-word vocabulary, {train_features.shape[1]} image tokens of "
          f"{train_features.shape[2]} features, language model {args.layers} × {args.d_model} "
          f"({sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters); encoder accuracy {encoder_acc:.4f}")
    stage_times, stage_steps = train_stages(model, tokenizer, labels, dataset.train_labels.tolist(),  # read once:
                                            train_features, args, out, autocast)    # indexing a GPU tensor syncs
    metrics = dict(dataset=name, encoder_acc=encoder_acc,
                   **evaluate_llava(model, tokenizer, labels, dataset.test_labels.tolist(), test_features, args.seed,
                                    autocast))
    metrics.update(stage_times_s=stage_times, stage_steps=stage_steps, pipeline_time_s=time.perf_counter() - started,
                   templates={k: dict(seen=v[0], heldout=v[1]) for k, v in TEMPLATES.items()})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print_report(metrics, labels.kinds, out)
    return metrics


if __name__ == "__main__":
    main()
