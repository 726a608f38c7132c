"""Instruction data for the tiny LLaVA, generated from a dataset's labels alone, and the word-level tokenizer for it.

LLaVA (Liu et al. 2023, section 3) turns image annotations into instruction-following conversations with a language
model. Ours has only class labels, so it does the same with templates, and says nothing about an image that its label
does not say:

    class        "what is in the image ?"                       -> the class name
    yesno        "is this a <class> ?"                          -> yes / no, balanced; half of the negatives hard
                                                                   (a class of the same superclass, where there is one)
    choice       "which one is in the image : a , b , c or d ?" -> the class name (4-way, options shuffled)
    superclass   "what kind of object is this ?"                -> CIFAR-100's coarse label (only where one exists)
    caption      "describe the image ."                         -> "a photo of a <class> ." (stage 1, alignment)

Each question type has several paraphrases seen in training and some held out for evaluation only; the held-out ones
reuse the seen ones' words in new orders, so they test whether the model understood the question, not new words.
With only a handful of seen sentences, a model can learn each one as a fixed string and misread a new order of the
same words; so in training (stages 0 and 2) half of the questions come with their words scrambled — in a random
order, a class name or the options moving as one word — and what decides the answer is which words are there (a
class name, a list of options, "kind"), not where. A held-out paraphrase is never a reordering of a seen one, so
scrambling never produces it.

A conversation is  <image>·n  user : QUESTION assistant : ANSWER <eos>  — the <image> placeholders are replaced by the
n image features (llava.py); only ANSWER and <eos> are trained on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

IMAGE, PAD, EOS = "<image>", "<pad>", "<eos>"
IGNORE_INDEX = -100                   # label of positions that are not trained on (F.cross_entropy's ignore_index)

TEMPLATES = {           # kind -> (seen paraphrases, held-out paraphrases); {} is a class name, {options} the choices
    "class": (["what is in the image ?", "what does the picture show ?", "name the object in this image .",
               "what object do you see ?", "what do you see in the picture ?", "name the object you see ."],
              ["what object is in the picture ?", "name what you see in this image ."]),
    "yesno": (["is this a {} ?", "does the image show a {} ?", "do you see a {} in the picture ?",
               "is the object in the image a {} ?"],
              ["does the picture show a {} ?"]),
    "choice": (["which one is in the image : {options} ?", "pick the object you see : {options} ?"],
               ["pick which one you see : {options} ?"]),
    "superclass": (["what kind of object is this ?", "what kind of object does the image show ?"],
                   ["what kind of object does this image show ?"]),
    "caption": (["describe the image ."], []),
}
CAPTION = "a photo of a {} ."
SCRAMBLE = 0.5                        # share of training questions asked with their words in a random order
ROLES = ("user :", "assistant :")


@dataclass
class Example:
    kind: str
    question: str
    answer: str
    template: str = ""                # the paraphrase the question was made from, before any class name went in


def name(label: str) -> str:
    """A class name as words: CIFAR-100's 'maple_tree' -> 'maple tree'."""
    return label.replace("_", " ").lower()


class Labels:
    """What the templates may say about an image: its class, and the superclass where the dataset has them."""

    def __init__(self, classes: list[str], coarse_classes: list[str] = (), coarse_of: list[int] | None = None):
        self.classes = [name(c) for c in classes]
        self.coarse_classes = [name(c) for c in coarse_classes]
        self.coarse_of = coarse_of                                 # class index -> superclass index, or None

    @property
    def kinds(self) -> list[str]:
        """The question types this dataset supports (caption is stage 1's, not a question)."""
        return ["class", "yesno", "choice"] + (["superclass"] if self.coarse_of is not None else [])

    def example(self, kind: str, label: int, rng: random.Random, heldout: bool = False,
                scramble: float = 0.0) -> Example:
        """One question of `kind` about an image of class `label`, with a paraphrase drawn from the seen or held-out
        set; with probability `scramble` its words are shuffled first (scrambled)."""
        template = rng.choice(TEMPLATES[kind][heldout])
        question = scrambled(template, rng) if scramble and rng.random() < scramble else template
        cls = self.classes[label]
        if kind in ("class", "caption"):
            answer = cls if kind == "class" else CAPTION.format(cls)
            return Example(kind, question, answer, template)
        if kind == "yesno":
            if rng.random() < 0.5:
                return Example(kind, question.format(cls), "yes", template)
            return Example(kind, question.format(self.classes[self.negative(label, rng)]), "no", template)
        if kind == "choice":
            others = rng.sample([c for i, c in enumerate(self.classes) if i != label], 3)
            options = rng.sample(others + [cls], 4)
            return Example(kind, question.format(options=f"{options[0]} , {options[1]} , {options[2]} or "
                                                         f"{options[3]}"), cls, template)
        if kind == "superclass":
            return Example(kind, question, self.coarse_classes[self.coarse_of[label]], template)
        raise ValueError(f"unknown question type {kind!r}")

    def negative(self, label: int, rng: random.Random) -> int:
        """A wrong class for a "no" answer: half the time a hard one (same superclass), where there are superclasses."""
        if self.coarse_of is not None and rng.random() < 0.5:
            siblings = [i for i, c in enumerate(self.coarse_of) if c == self.coarse_of[label] and i != label]
            if siblings:
                return rng.choice(siblings)
        return rng.choice([i for i in range(len(self.classes)) if i != label])

    def words(self) -> set[str]:
        """Every word a conversation about this dataset can contain."""
        texts = [t for seen, held in TEMPLATES.values() for t in seen + held] + [CAPTION, *ROLES, "yes no , or"]
        texts += self.classes + self.coarse_classes
        return {w for t in texts for w in t.replace("{options}", "").replace("{}", "").split()}


def scrambled(template: str, rng: random.Random) -> str:
    """The template's words in a random order, its closing "?" or "." kept last; a slot ({} or {options}) is one
    word, so a class name or the list of options stays whole."""
    *words, end = template.split()
    rng.shuffle(words)
    return " ".join(words + [end])


class Tokenizer:
    """Word level: the text is split on spaces (the templates space out their punctuation); no download, no merges."""

    def __init__(self, words: set[str]):
        self.vocab = [PAD, IMAGE, EOS] + sorted(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.image_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.index]
        if unknown:
            raise ValueError(f"words not in the vocabulary: {unknown}")
        return [self.index[w] for w in text.split()]

    def decode(self, ids) -> str:
        """Token ids -> text, stopping at <eos> and skipping padding."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                words.append(self.vocab[i])
        return " ".join(words)


def prompt(example: Example, n_image_tokens: int) -> str:
    """What the model is given: the image placeholders, then the user's question, then the assistant's turn."""
    return " ".join([IMAGE] * n_image_tokens + [ROLES[0], example.question, ROLES[1]])
