"""Datasets as GPU-resident tensors, and augmentation that runs on the GPU.

    cifar100, cifar10   the official python-pickle archives (Krizhevsky 2009), downloaded into ./data on first use and
                        checked against their MD5; or read from --data-dir (the archive, or its extracted folder)
    fashion-mnist       the official IDX files (Xiao et al. 2017), from --data-dir or the Debian package's folder
    synthetic           class-dependent colour patterns generated in memory, CIFAR-shaped; for tests and smoke runs

Every loader returns a `Dataset` of uint8 images (n, channels, h, w) and int64 labels. The whole set is moved to the
training device once; `augment` then draws random crops, flips and erased patches for a batch there, so the input
pipeline costs a few kernel launches per batch, never a CPU loader.

Problems with the data (offline with no copy, a wrong checksum, a truncated file) raise `DataError`, whose message says
what to do; the scripts print it without a traceback.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


class DataError(Exception):
    """The data could not be found or read; the message says what to do about it."""


@dataclass
class Dataset:
    name: str
    train_images: torch.Tensor           # (n_train, channels, h, w) uint8
    train_labels: torch.Tensor           # (n_train,) int64
    test_images: torch.Tensor            # (n_test, channels, h, w) uint8
    test_labels: torch.Tensor            # (n_test,) int64
    classes: list[str]                   # class index -> name
    coarse_classes: list[str] = field(default_factory=list)        # CIFAR-100's 20 superclasses
    train_coarse: torch.Tensor | None = None                        # (n_train,) superclass of each image
    test_coarse: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def map_tensors(self, fn) -> "Dataset":
        """The same dataset with fn applied to each of its tensors (images, labels, superclasses)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def limit(self, n: int | None) -> "Dataset":
        """The first n training and n test examples (all when n is None)."""
        return self if n is None else self.map_tensors(lambda x: x[:n])

    def to(self, device: torch.device | str) -> "Dataset":
        return self.map_tensors(lambda x: x.to(device))


# ---------------------------------------------------------------------------------------------------- CIFAR

@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    md5: str
    folder: str                  # what the archive extracts to
    train: tuple[str, ...]       # pickle members holding the training set
    test: str
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR = {
    "cifar10": Archive("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                       b"labels", b"label_names"),
    "cifar100": Archive("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", ("train",), "test", "meta",
                        b"fine_labels", b"fine_label_names"),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: Path) -> None:
    """Fetch url into path through a .part file, with a progress bar: an interrupted download never looks complete."""
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except OSError as error:                     # URLError, timeouts, refused connections are all OSErrors
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({error}). Without internet access, put {path.name} (or its "
                        f"extracted folder) in {path.parent}/ or pass --data-dir DIR pointing at a folder holding it."
                        ) from None
    part.replace(path)


def find_cifar(archive: Archive, data_dir: str | None) -> Path:
    """The extracted folder or the verified archive: from data_dir if given, else ./data (downloading if needed)."""
    if data_dir is not None:
        root = Path(data_dir)
        for folder in (root / archive.folder, root):
            if (folder / archive.meta).is_file():
                return folder
        if (root / archive.filename).is_file():
            if md5sum(root / archive.filename) != archive.md5:
                raise DataError(f"{root / archive.filename} has the wrong MD5 checksum (expected {archive.md5}): the "
                                "file is truncated or corrupt; replace it with a fresh copy of the official archive")
            return root / archive.filename
        raise DataError(f"no {archive.filename} and no {archive.folder}/ folder in {root}: put the official archive "
                        f"({archive.url}) or its extracted folder there")
    root = Path("data")
    if (root / archive.folder / archive.meta).is_file():
        return root / archive.folder
    path = root / archive.filename
    if path.is_file() and md5sum(path) != archive.md5:
        print(f"{path} is incomplete or corrupt (MD5 mismatch): downloading it again")
        path.unlink()
    if not path.is_file():
        download(archive.url, path)
        if md5sum(path) != archive.md5:
            path.unlink()
            raise DataError(f"the download of {archive.url} has the wrong MD5 checksum; try again")
    return path


def read_cifar(name: str, data_dir: str | None) -> Dataset:
    archive = CIFAR[name]
    source = find_cifar(archive, data_dir)

    def load(member: str) -> dict:
        try:
            if source.is_dir():
                return pickle.loads((source / member).read_bytes(), encoding="bytes")
            with tarfile.open(source) as tar:
                return pickle.loads(tar.extractfile(f"{archive.folder}/{member}").read(), encoding="bytes")
        except (OSError, EOFError, KeyError, pickle.UnpicklingError, tarfile.TarError) as error:
            raise DataError(f"could not read {member} from {source} ({error!r}): the copy is incomplete or not the "
                            f"official {archive.filename}") from None

    def split(members):
        parts = [load(m) for m in members]
        images = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[archive.label_key] for p in parts])
        coarse = np.concatenate([p[b"coarse_labels"] for p in parts]) if b"coarse_labels" in parts[0] else None
        return torch.from_numpy(images), torch.from_numpy(labels).long(), (
            None if coarse is None else torch.from_numpy(coarse).long())

    train_x, train_y, train_c = split(archive.train)
    test_x, test_y, test_c = split((archive.test,))
    meta = load(archive.meta)
    names = lambda key: [n.decode() for n in meta.get(key, [])]
    return Dataset(name, train_x, train_y, test_x, test_y, names(archive.names_key),
                   names(b"coarse_label_names"), train_c, test_c)


# -------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"          # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or not): a big-endian header of magic (0, 0, dtype 0x08 = uint8, rank) and rank sizes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 IDX file")
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    body = raw[4 + 4 * rank:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: its header promises {int(np.prod(shape))} bytes, it holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_fashion_mnist(data_dir: str | None) -> Dataset:
    root = Path(data_dir or FASHION_MNIST_DIR)

    def load(stem: str) -> torch.Tensor:
        for path in (root / f"{stem}.gz", root / stem):
            if path.is_file():
                try:
                    return torch.from_numpy(read_idx(path).copy())
                except (OSError, EOFError, gzip.BadGzipFile) as error:
                    raise DataError(f"could not read {path} ({error}): the file is corrupt") from None
        raise DataError(f"Fashion-MNIST's {stem}.gz is not in {root}: `apt-get install dataset-fashion-mnist` puts "
                        f"the official files in {FASHION_MNIST_DIR}, or pass --data-dir DIR with the four IDX files")

    return Dataset("fashion-mnist", load("train-images-idx3-ubyte")[:, None], load("train-labels-idx1-ubyte").long(),
                   load("t10k-images-idx3-ubyte")[:, None], load("t10k-labels-idx1-ubyte").long(),
                   FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------ synthetic

SYNTHETIC_CLASSES = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "gray", "orange", "purple"]


def make_synthetic(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> Dataset:
    """CIFAR-shaped images whose class sets the colour of a bright square at a random place on a noisy background:
    learnable in a few steps, so smoke runs show the loss falling."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230],
                            [230, 30, 230], [230, 230, 230], [128, 128, 128], [240, 140, 20], [120, 20, 160]])

    def split(n):
        labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=g)
        images = torch.randint(0, 80, (n, 3, 32, 32), generator=g)
        top, left = torch.randint(0, 20, (2, n), generator=g)
        for i in range(n):
            images[i, :, top[i]:top[i] + 12, left[i]:left[i] + 12] = colours[labels[i], :, None, None]
        return images.to(torch.uint8), labels

    return Dataset("synthetic", *split(n_train), *split(n_test), SYNTHETIC_CLASSES)


DATASETS = ("cifar100", "cifar10", "fashion-mnist", "synthetic")


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The dataset `name` (one of DATASETS) on the CPU; raises DataError with advice when it cannot be had."""
    if name in CIFAR:
        return read_cifar(name, data_dir)
    if name == "fashion-mnist":
        return read_fashion_mnist(data_dir)
    if name == "synthetic":
        return make_synthetic()
    raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


# ------------------------------------------------------------------------------------------- on-GPU batches

def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (b, c, h, w) -> float (b, c, h, w) with zero mean and unit variance per channel (statistics of train)."""
    return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (n, c, h, w), in [0, 1] units."""
    x = images.float().div(255).transpose(0, 1).flatten(1)          # (c, n·h·w)
    return x.mean(1), x.std(1)


def augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
            pad: int = 4, erase_p: float = 0.5) -> torch.Tensor:
    """The training augmentation of uint8 images (b, c, h, w), on whatever device they live, -> normalised floats:
    a random crop of the image padded by `pad` black pixels (a shift of up to ±pad), a horizontal flip with
    probability ½, and random erasing (Zhong et al. 2017): with probability erase_p, a rectangle of 2-40% of the area
    with aspect ratio 0.3-3.3 is set to the mean (0 once normalised)."""
    b, c, h, w = images.shape
    dev = images.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))               # (b, c, h + 2pad, w + 2pad)
    dy, dx = (rand(2, b) * (2 * pad + 1)).long()                                  # crop offsets in [0, 2·pad]
    rows = dy[:, None] + torch.arange(h, device=dev)                             # (b, h)
    cols = dx[:, None] + torch.arange(w, device=dev)                             # (b, w)
    cols = torch.where((rand(b) < 0.5)[:, None], cols.flip(1), cols)             # horizontal flip
    batch = torch.arange(b, device=dev)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    area = (0.02 + 0.38 * rand(b)) * h * w                                       # erased rectangle, per image
    aspect = torch.exp((rand(b) * 2 - 1) * math.log(1 / 0.3))
    eh, ew = (area * aspect).sqrt().clamp(max=h), (area / aspect).sqrt().clamp(max=w)
    top, left = rand(b) * (h - eh), rand(b) * (w - ew)
    y = torch.arange(h, device=dev)[None, :, None]                               # (1, h, 1)
    x = torch.arange(w, device=dev)[None, None, :]                               # (1, 1, w)
    inside = ((y >= top[:, None, None]) & (y < (top + eh)[:, None, None]) &
              (x >= left[:, None, None]) & (x < (left + ew)[:, None, None]))    # (b, h, w)
    erase = inside & (rand(b) < erase_p)[:, None, None]
    return normalize(crops, mean, std).masked_fill(erase[:, None], 0.0)


def train_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
                  ) -> torch.Tensor:
    """One epoch's index batches (n_batches, batch_size // world) for this rank: a random permutation (the same on
    every rank: they share the generator's seed), cut into global batches of batch_size, the last partial one
    dropped; rank r takes every world-th example of each global batch."""
    n_batches = n // batch_size
    order = torch.randperm(n, generator=generator)[: n_batches * batch_size]
    return order.view(n_batches, batch_size)[:, rank::world]


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, ...]:
    """Every world-th index from rank, in batches: the ranks together see each example exactly once."""
    mine = torch.arange(n)[rank::world]
    return mine.split(batch_size) if len(mine) else ()
