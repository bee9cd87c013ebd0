from __future__ import annotations

import numpy as np
import pytest

from conftest import FASHION, make_idx_folder, require
from vae.config import TrainConfig
from vae.data import DataError, _MEMO, find_idx_folder, load, read_idx, stratified_split


def test_sample_is_real_mnist_with_fixed_stratified_test(sample_data):
    full = load(TrainConfig(dataset="mnist-sample"))
    assert len(full.test) == 1000 and len(full.train) + len(full.val) == 4000
    assert np.bincount(full.test.labels.numpy()).tolist() == [100] * 10
    assert np.bincount(full.val.labels.numpy()).tolist() == [80] * 10  # 20% of 400 per class
    assert full.train.images.dtype.is_floating_point is False and full.train.images.shape[1:] == (28, 28)
    # real digits: mostly black background, bright strokes
    img = full.test.images.float() / 255
    assert 0.08 < img.mean() < 0.2 and img.max() == 1.0
    # source positions are disjoint between the parts
    assert not set(full.test.index.tolist()) & set(full.train.index.tolist())


def test_split_is_deterministic_and_seeded():
    y = np.repeat(np.arange(10), 50)
    a = stratified_split(y, 0.2, seed=3)
    b = stratified_split(y, 0.2, seed=3)
    c = stratified_split(y, 0.2, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == 100 and not set(a[0]) & set(a[1])
    assert np.bincount(y[a[1]]).tolist() == [10] * 10


def test_the_test_split_is_always_whole():
    small = load(TrainConfig(dataset="mnist-sample", max_train_images=300))
    full = load(TrainConfig(dataset="mnist-sample"))
    assert len(small.train) == 300 and len(small.test) == len(full.test) == 1000
    assert np.array_equal(small.test.index.numpy(), full.test.index.numpy())


def test_load_is_memoised_per_process():
    c = TrainConfig(dataset="mnist-sample", max_train_images=300)
    assert load(c) is load(c.replace(seed=99, beta=3.0))  # training-only fields share the data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_plain_and_gz(tmp_path, gz):
    folder = make_idx_folder(tmp_path / "idx", n_train=200, n_test=60, gz=gz)
    data = load(TrainConfig(dataset="mnist", data_dir=str(folder), val_fraction=0.25))
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 60
    assert data.test.images.shape == (60, 28, 28)


def test_torchvision_layout_is_found(tmp_path):
    make_idx_folder(tmp_path / "MNIST" / "raw")
    assert find_idx_folder(tmp_path, "mnist") == tmp_path / "MNIST" / "raw"


def test_real_full_size_idx_files():
    require(FASHION.exists(), "Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    data = load(TrainConfig(dataset="fashion-mnist", data_dir=str(FASHION)))
    assert len(data.train) == 48000 and len(data.val) == 12000 and len(data.test) == 10000
    assert np.bincount(data.test.labels.numpy()).tolist() == [1000] * 10


def test_missing_empty_truncated_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(TrainConfig(dataset="mnist", data_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no mnist IDX files.*mnist-sample"):
        load(TrainConfig(dataset="mnist", data_dir=str(tmp_path / "empty")))
    folder = make_idx_folder(tmp_path / "trunc")
    f = folder / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load(TrainConfig(dataset="mnist", data_dir=str(folder)))
    folder = make_idx_folder(tmp_path / "corrupt", gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        load(TrainConfig(dataset="mnist", data_dir=str(folder)))
    bad = tmp_path / "bad-header"
    bad.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    with pytest.raises(DataError, match="not a uint8 IDX"):
        read_idx(bad)


def test_offline_without_data_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_STUDY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        load(TrainConfig(dataset="mnist"))
    msg = str(err.value)
    assert "--data-dir" in msg and "--dataset mnist-sample" in msg and "\n" not in msg


def test_download_while_offline_is_a_clear_error(tmp_path, monkeypatch):
    # This machine has no internet: torchvision's real download fails, and we say what to do.
    monkeypatch.setenv("VAE_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("socket.getaddrinfo", _no_network)  # keep the test fast and offline everywhere
    _MEMO.clear()
    with pytest.raises(DataError) as err:
        load(TrainConfig(dataset="mnist", download=True))
    msg = str(err.value)
    assert "could not download mnist" in msg and "--dataset mnist-sample" in msg


def _no_network(*a, **k):
    import socket

    raise socket.gaierror("no network in this test")


def test_split_is_cached_and_the_cache_gives_the_same_split(tmp_path, monkeypatch):
    """Drawn once with scikit-learn, then read back from the per-user cache: the same positions,
    and a damaged cache file is drawn again rather than trusted."""
    monkeypatch.setenv("VAE_STUDY_CACHE", str(tmp_path))
    y = np.repeat(np.arange(10), 40)
    first = stratified_split(y, 0.25, seed=7)
    files = list((tmp_path / "splits").glob("*.npz"))
    assert len(files) == 1
    again = stratified_split(y, 0.25, seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    files[0].write_bytes(b"not an npz")
    redrawn = stratified_split(y, 0.25, seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(first, redrawn))
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 1
    other = stratified_split(y, 0.25, seed=8)  # another seed is another entry
    assert not np.array_equal(other[1], first[1]) and len(list((tmp_path / "splits").glob("*.npz"))) == 2
