"""Loaders (data.py) against archives and IDX files the tests build in the official formats — good, wrong checksum,
truncated, missing — and the on-device batching and augmentation."""
import dataclasses
import gzip
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mini_mamba import data


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def make_cifar_archive(name: str, folder: Path, n: int = 6) -> Path:
    """A small archive with the official layout: <folder>/<members> of pickled dicts with bytes keys."""
    archive = data.CIFAR[name]
    rng = np.random.default_rng(0)
    split = lambda: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     archive.label_key: list(range(n)), b"coarse_labels": [i // 2 for i in range(n)]}
    if name == "cifar10":
        members = {m: {k: v for k, v in split().items() if k != b"coarse_labels"} for m in (*archive.train,
                                                                                                   archive.test)}
        members[archive.meta] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    else:
        members = {m: split() for m in (*archive.train, archive.test)}
        members[archive.meta] = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                 b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive.filename
    with tarfile.open(path, "w:gz") as tar:
        for member, content in members.items():
            raw = pickled(content)
            info = tarfile.TarInfo(f"{archive.folder}/{member}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def trusted(monkeypatch):
    """Make the loader trust a test archive's MD5 (the real ones are the official archives')."""
    def trust(name: str, path: Path):
        monkeypatch.setitem(data.CIFAR, name, dataclasses.replace(data.CIFAR[name], md5=data.md5sum(path)))
    return trust


@pytest.mark.parametrize("name, n_classes, n_train", [("cifar10", 10, 30), ("cifar100", 100, 6)])
def test_official_archive_from_data_dir(tmp_path, trusted, name, n_classes, n_train):
    path = make_cifar_archive(name, tmp_path)
    trusted(name, path)
    ds = data.load_dataset(name, str(tmp_path))
    assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (6, 3, 32, 32) and ds.test_labels.tolist() == list(range(6))
    assert len(ds.classes) == n_classes
    if name == "cifar100":
        assert len(ds.coarse_classes) == 20 and ds.test_coarse.tolist() == [0, 0, 1, 1, 2, 2]


def test_extracted_folder_is_read_without_the_archive(tmp_path):
    path = make_cifar_archive("cifar100", tmp_path / "archive")
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    from_folder = data.load_dataset("cifar100", str(tmp_path / "extracted"))                     # the parent
    from_inner = data.load_dataset("cifar100", str(tmp_path / "extracted" / "cifar-100-python"))  # the folder
    assert torch.equal(from_folder.train_images, from_inner.train_images) and len(from_folder.classes) == 100


def test_wrong_checksum_in_data_dir_is_a_clear_error(tmp_path):
    make_cifar_archive("cifar100", tmp_path)                        # not the official bytes: the MD5 differs
    with pytest.raises(data.DataError, match="wrong MD5 checksum"):
        data.load_dataset("cifar100", str(tmp_path))


def test_truncated_archive_is_detected(tmp_path, trusted):
    path = make_cifar_archive("cifar10", tmp_path)
    trusted("cifar10", path)
    path.write_bytes(path.read_bytes()[:200])                        # cut short after the checksum was recorded
    with pytest.raises(data.DataError, match="wrong MD5 checksum"):
        data.load_dataset("cifar10", str(tmp_path))


def test_missing_data_dir_copy_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="no cifar-100-python.tar.gz .* put the official archive"):
        data.load_dataset("cifar100", str(tmp_path))


def test_offline_with_no_copy_says_where_to_put_the_archive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match=r"could not download .* put cifar-10-python.tar.gz"):
        data.load_dataset("cifar10")
    assert not any((tmp_path / "data").iterdir())                    # no partial file left behind


def test_corrupt_download_is_fetched_again(tmp_path, monkeypatch, trusted):
    monkeypatch.chdir(tmp_path)
    good = make_cifar_archive("cifar10", tmp_path / "source")
    trusted("cifar10", good)
    cached = tmp_path / "data" / good.name
    cached.parent.mkdir()
    cached.write_bytes(good.read_bytes()[:100])                      # a partial earlier download
    fetched = []
    def fake_download(url, path):
        fetched.append(url)
        Path(path).write_bytes(good.read_bytes())
    monkeypatch.setattr(data, "download", fake_download)
    ds = data.load_dataset("cifar10")
    assert fetched == [data.CIFAR["cifar10"].url] and len(ds.train_images) == 30


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - truncate]))


def make_fashion_mnist(folder: Path, truncate: int = 0) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), truncate)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_idx_files(tmp_path):
    make_fashion_mnist(tmp_path)
    ds = data.load_dataset("fashion-mnist", str(tmp_path))
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_labels.tolist() == [0, 1, 2, 3, 4]
    assert ds.classes[9] == "ankle boot"


def test_truncated_idx_file_is_detected(tmp_path):
    make_fashion_mnist(tmp_path, truncate=10)
    with pytest.raises(data.DataError, match="truncated"):
        data.load_dataset("fashion-mnist", str(tmp_path))


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", str(tmp_path))


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist():
    ds = data.load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(data.DataError, match="unknown dataset 'mnist'"):
        data.load_dataset("mnist")


def test_synthetic_is_cifar_shaped_and_reproducible():
    a, b = data.make_synthetic(50, 20, seed=3), data.make_synthetic(50, 20, seed=3)
    assert a.train_images.shape == (50, 3, 32, 32) and torch.equal(a.train_images, b.train_images)
    assert a.limit(7).test_labels.shape == (7,)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), per_rank=st.integers(1, 16), world=st.integers(1, 4), seed=st.integers(0, 99))
def test_train_batches_split_each_global_batch_across_ranks(n, per_rank, world, seed):
    batch = per_rank * world
    shards = [data.train_batches(n, batch, torch.Generator().manual_seed(seed), r, world) for r in range(world)]
    assert all(s.shape == (n // batch, per_rank) for s in shards)
    together = torch.cat([s.reshape(-1) for s in shards])
    assert together.unique().numel() == together.numel() == (n // batch) * batch       # disjoint, none repeated


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 100), batch=st.integers(1, 16), world=st.integers(1, 4))
def test_eval_batches_see_every_example_once(n, batch, world):
    seen = torch.cat([b for r in range(world) for b in data.eval_batches(n, batch, r, world)])
    assert sorted(seen.tolist()) == list(range(n))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31), channels=st.sampled_from([1, 3]))
def test_augment_without_shift_or_erasing_only_flips(seed, channels):
    images = torch.randint(0, 256, (6, channels, 8, 8), dtype=torch.uint8)
    mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
    out = data.augment(images, mean, std, torch.Generator().manual_seed(seed), pad=0, erase_p=0.0)
    plain = data.normalize(images, mean, std)
    for o, p in zip(out, plain):
        assert torch.equal(o, p) or torch.equal(o, p.flip(-1))


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images (b, c, h, w) moved dy pixels down and dx right, the uncovered border black (a negative pad crops)."""
    return torch.nn.functional.pad(images, (dx, -dx, dy, -dy))


def test_the_shift_of_these_tests_moves_the_image_and_fills_the_uncovered_border_with_black():
    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)
    assert shift(image, 1, 0)[0, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]      # down
    assert shift(image, 0, -1)[0, 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]     # left
    assert shift(image, -1, 1)[0, 0].tolist() == [[0, 4, 5], [0, 7, 8], [0, 0, 0]]     # up and right


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31), pad=st.integers(0, 3), channels=st.sampled_from([1, 3]))
def test_each_training_crop_is_a_shift_of_at_most_pad_pixels_mirrored_or_not(seed, pad, channels):
    images = torch.randint(1, 256, (6, channels, 8, 8), dtype=torch.uint8)   # no black pixel: every shift differs
    mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
    crops = data.augment(images, mean, std, torch.Generator().manual_seed(seed), pad=pad, erase_p=0.0)
    moves = range(-pad, pad + 1)
    shifted = [data.normalize(shift(images, dy, dx), mean, std) for dy in moves for dx in moves]
    for i, crop in enumerate(crops):
        assert sum(torch.equal(crop, s[i]) or torch.equal(crop, s[i].flip(-1)) for s in shifted) == 1


def test_augment_is_reproducible_and_shifts_and_erases():
    images = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.zeros(3), torch.ones(3)
    a = data.augment(images, mean, std, torch.Generator().manual_seed(1), pad=4, erase_p=1.0)
    b = data.augment(images, mean, std, torch.Generator().manual_seed(1), pad=4, erase_p=1.0)
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.float32
    assert ((a == 0).flatten(1).any(1)).all()                      # every image lost some pixels (border or erase)
    assert not torch.equal(a, data.normalize(images, mean, std))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31), channels=st.sampled_from([1, 3]))
def test_random_erasing_sets_one_rectangle_to_the_mean_and_leaves_the_rest(seed, channels):
    images = torch.randint(0, 256, (8, channels, 12, 12), dtype=torch.uint8)
    mean, std = torch.full((channels,), 0.41), torch.full((channels,), 0.3)  # no pixel value is exactly the mean
    augment = lambda p: data.augment(images, mean, std, torch.Generator().manual_seed(seed), pad=2, erase_p=p)
    plain, erased = augment(0.0), augment(1.0)                    # the same draws: same crops, flips and rectangles
    changed = erased != plain                                     # (b, c, h, w)
    assert (erased[changed] == 0).all() and changed.any()         # the mean is 0 once normalised
    for image in changed:                                         # one rectangle, through every channel
        assert (image == image[0]).all()
        rows, cols = image[0].any(1).nonzero().flatten(), image[0].any(0).nonzero().flatten()
        if rows.numel() == 0:                                     # a rectangle under a pixel wide can miss them all
            continue
        box = image[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and image[0].sum() == box.numel()
