"""The tiny LLaVA: the instruction data (instruct.py), the splice and label masking (llava.py) on a hand-checked
example, frozen weights in stage 1, and a smoke run of train_llava.py."""
import json
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_cifar
import train_llava
from mini_mamba.instruct import IGNORE_INDEX, SCRAMBLE, TEMPLATES, Example, Labels, Tokenizer, scrambled
from mini_mamba.llava import TinyLLaVA, build_batch, show_batch
from mini_mamba.mamba import MambaConfig, MambaLM
from mini_mamba.vision import build_model

CLASSES = ["apple", "maple_tree", "oak_tree", "rose", "tulip", "bus"]
COARSE = ["fruit", "trees", "flowers", "vehicles"]
COARSE_OF = [0, 1, 1, 2, 2, 3]


def tiny_llava(labels: Labels) -> tuple[TinyLLaVA, Tokenizer]:
    torch.manual_seed(0)
    tokenizer = Tokenizer(labels.words())
    lm = MambaLM(MambaConfig(d_model=16, n_layers=1, vocab_size=len(tokenizer), d_state=4))
    return TinyLLaVA(build_model("tiny", 3, len(labels.classes)), lm, tokenizer.image_id), tokenizer


def test_splice_and_label_masking_on_a_hand_checked_example():
    labels = Labels(CLASSES, COARSE, COARSE_OF)
    model, tok = tiny_llava(labels)
    example = Example("yesno", "is this a maple tree ?", "no")
    input_ids, target = build_batch(tok, [example, Example("class", "what is this ?", "oak tree")], n_image_tokens=2)
    words = "<image> <image> user : is this a maple tree ? assistant : no <eos>".split()
    assert [tok.vocab[i] for i in input_ids[0]] == words
    assert [tok.vocab[i] if i != IGNORE_INDEX else None for i in target[0]] == [None] * 12 + ["no", "<eos>"]
    assert [tok.vocab[i] for i in input_ids[1]][-4:] == ["oak", "tree", "<eos>", "<pad>"]          # right-padded
    assert target[1].tolist()[-4:] == [tok.index["oak"], tok.index["tree"], tok.eos_id, IGNORE_INDEX]
    assert "10 | assistant | ·" in show_batch(tok, input_ids, target) and "12 | no        | no" in show_batch(
        tok, input_ids, target)

    features = torch.randn(2, 2, model.vision.config.dims[-1])                          # (b, n_image, d_vision)
    embeddings = model.embed(input_ids, features)
    projected = model.projector(features)
    torch.testing.assert_close(embeddings[:, :2], projected)                            # the placeholders' places
    torch.testing.assert_close(embeddings[:, 2:], model.lm.embedding(input_ids[:, 2:]))  # the text is untouched


def test_placeholder_count_must_match_the_image_features():
    model, tok = tiny_llava(Labels(CLASSES))
    input_ids, _ = build_batch(tok, [Example("class", "what is this ?", "bus")], n_image_tokens=3)
    with pytest.raises(ValueError, match=r"as many <image> placeholders as there are image features \(2\); found \[3\]"):
        model.embed(input_ids, torch.randn(1, 2, model.vision.config.dims[-1]))


def test_stage_one_trains_the_projector_and_nothing_else():
    labels = Labels(CLASSES)
    model, tok = tiny_llava(labels)
    frozen = {k: v.clone() for k, v in [*model.vision.state_dict().items(),
                                        *(("lm." + k, v) for k, v in model.lm.state_dict().items())]}
    projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    images = torch.randn(4, 3, 32, 32)
    features = model.encode_images(images)
    batch = build_batch(tok, [labels.example("caption", i, random.Random(i)) for i in range(4)], features.shape[1])
    train_llava.run_stage(model, [model.projector], 1, lambda step: (*batch, features), 1e-2,
                          torch.autocast("cpu", enabled=False))
    after = {**model.vision.state_dict(), **{"lm." + k: v for k, v in model.lm.state_dict().items()}}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)                  # weights and BN statistics
    assert any(not torch.equal(projector[k], v) for k, v in model.projector.state_dict().items())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(sorted(Labels(CLASSES, COARSE, COARSE_OF).words())), min_size=1, max_size=12))
def test_tokenizer_round_trip(words):
    tok = Tokenizer(Labels(CLASSES, COARSE, COARSE_OF).words())
    text = " ".join(words)
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_rejects_unknown_words():
    with pytest.raises(ValueError, match="not in the vocabulary: \\['zebra'\\]"):
        Tokenizer(Labels(CLASSES).words()).encode("is this a zebra ?")


def test_held_out_paraphrases_are_new_sentences_made_of_seen_words():
    for kind, (seen, heldout) in TEMPLATES.items():
        seen_words = {w for t in seen for w in t.split()}
        for sentence in heldout:
            assert sentence not in seen and set(sentence.split()) <= seen_words, (kind, sentence)


def test_held_out_paraphrases_are_no_reordering_of_a_seen_one():                 # so scrambling never makes one
    seen = [sorted(t.split()) for kind_seen, _ in TEMPLATES.values() for t in kind_seen]
    assert not [t for _, heldout in TEMPLATES.values() for t in heldout if sorted(t.split()) in seen]


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([t for seen, heldout in TEMPLATES.values() for t in seen + heldout]), st.integers(0, 2 ** 32))
def test_scrambling_reorders_the_words_and_keeps_the_closing_mark(template, seed):
    mixed = scrambled(template, random.Random(seed))
    assert sorted(mixed.split()) == sorted(template.split()) and mixed.split()[-1] == template.split()[-1]


def test_about_half_the_training_questions_are_scrambled_with_class_names_whole():
    labels, rng = Labels(CLASSES, COARSE, COARSE_OF), random.Random(0)
    asked = [labels.example("class", 1, rng, scramble=SCRAMBLE) for _ in range(2000)]
    assert 0.45 < sum(e.question == e.template for e in asked) / len(asked) < 0.6
    assert all(e.question == e.template for e in [labels.example("class", 1, rng) for _ in range(100)])
    yes = [e for e in (labels.example("yesno", 1, rng, scramble=1.0) for _ in range(200)) if e.answer == "yes"]
    assert all("maple tree" in e.question for e in yes) and any(e.question.split()[0] != e.template.split()[0]
                                                              for e in yes)


def test_yes_no_is_balanced_with_hard_negatives_from_the_same_superclass():
    labels = Labels(CLASSES, COARSE, COARSE_OF)
    rng = random.Random(0)
    tree = CLASSES.index("maple_tree")
    answers = [labels.example("yesno", tree, rng) for _ in range(4000)]
    negatives = [e for e in answers if e.answer == "no"]
    assert 0.47 < len(negatives) / len(answers) < 0.53
    assert all("maple tree" not in e.question for e in negatives)
    hard = sum("oak tree" in e.question for e in negatives) / len(negatives)       # the only sibling: ½ + ½·⅕
    assert 0.55 < hard < 0.65


def test_choice_offers_four_distinct_options_with_the_answer():
    labels = Labels(CLASSES)
    rng = random.Random(1)
    for label in range(len(CLASSES)):
        e = labels.example("choice", label, rng)
        options = e.question.split(": ")[1].rstrip(" ?").replace(" or ", " , ").split(" , ")
        assert len(set(options)) == 4 and e.answer in options and e.answer == labels.classes[label]


def test_superclass_questions_only_where_the_dataset_has_superclasses():
    assert "superclass" in Labels(CLASSES, COARSE, COARSE_OF).kinds and "superclass" not in Labels(CLASSES).kinds
    assert Labels(CLASSES, COARSE, COARSE_OF).example("superclass", 4, random.Random(0)).answer == "flowers"


def test_smoke_run_of_train_llava_on_synthetic(tmp_path):
    train_cifar.main(["--dataset", "synthetic", "--model", "tiny", "--limit", "64", "--batch-size", "32",
                      "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "vision")])
    metrics = train_llava.main(["--vision-ckpt", str(tmp_path / "vision" / "model.pt"), "--limit", "24",
                                "--batch-size", "8", "--stage0-steps", "150", "--d-model", "16", "--layers", "1",
                                "--device", "cpu", "--out", str(tmp_path / "llava")])     # 150 · 24/2000 -> 2
    written = json.loads((tmp_path / "llava" / "metrics.json").read_text())
    assert written["accuracy"] == metrics["accuracy"]
    assert set(written["accuracy"]) == {"class", "class_heldout", "yesno", "yesno_heldout", "choice",
                                        "choice_heldout"} == set(written["blind_accuracy"])
    assert 0.0 <= written["encoder_acc"] <= 1.0 and written["samples"]
    turns = written["samples"][0]["turns"]                    # each question type, seen and held-out paraphrases
    assert [t["heldout"] for t in turns] == [False, True] * 3
    assert turns[1]["question"] in TEMPLATES["class"][1]
    assert written["stage_steps"] == {"stage0": 2, "stage1": 3, "stage2": 9}     # stage 0 shortened with --limit
    for key, accuracy in written["accuracy"].items():             # per paraphrase: the same answers, broken down
        rows = [r for r in written["by_template"] if r["kind"] == key.split("_")[0] and r["heldout"] == ("_" in key)]
        assert sum(r["n"] for r in rows) == 24 and {r["template"] for r in rows} <= set(
            TEMPLATES[rows[0]["kind"]][rows[0]["heldout"]])
        assert sum(r["n"] * r["accuracy"] for r in rows) / 24 == pytest.approx(accuracy)
        assert all(sum(r["wrong"].values()) <= round(r["n"] * (1 - r["accuracy"])) for r in rows)
    stages = [torch.load(tmp_path / "llava" / f"stage{k}.pt", weights_only=False) for k in range(3)]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert same(stages[0]["lm"], stages[1]["lm"])                   # stage 1: the language model is frozen
    assert not same(stages[0]["projector"], stages[1]["projector"])
    assert not same(stages[1]["lm"], stages[2]["lm"]) and not same(stages[1]["projector"], stages[2]["projector"])


def write_truncated_file(path):
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "train one first"),                                                  # no file at all
    (write_truncated_file, "could not be read as a model.pt of train_cifar.py"),
    (lambda path: path.write_text("not a checkpoint"), "could not be read as a model.pt of train_cifar.py"),
    (lambda path: torch.save({"model": {}, "ema": None, "optimizer": {}}, path),             # train_cifar's checkpoint
     "is not a model.pt of train_cifar.py: it has no config, classes, mean, std"),
])
def test_a_missing_or_wrong_vision_checkpoint_is_a_clear_error(tmp_path, capsys, make, message):
    make(tmp_path / "vision.pt")
    with pytest.raises(SystemExit) as stopped:
        train_llava.main(["--vision-ckpt", str(tmp_path / "vision.pt"), "--device", "cpu", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
