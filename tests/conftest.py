from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every Ray node in tests lives on 127.0.0.1 (see DEVELOPERS.md / README).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def require(ok: bool, what: str) -> None:
    """A prerequisite of a test: skipped where it is missing, except in CI (CI=true), where the
    run fails, so that a missing install step is never hidden by a skip."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI lacks a prerequisite: {what}")
    pytest.skip(f"needs {what}")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture(scope="session")
def sample_config():
    from vae.config import TrainConfig

    return TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=8, max_train_images=400)


@pytest.fixture(scope="session")
def sample_data(sample_config):
    from vae.data import load

    return load(sample_config)


def write_idx(path: Path, array, gz: bool = False) -> None:
    import gzip
    import struct

    import numpy as np

    arr = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_folder(folder: Path, n_train: int = 200, n_test: int = 100, gz: bool = False, seed: int = 0) -> Path:
    """Small IDX files in the MNIST layout, holding real digits from the embedded sample."""
    import numpy as np

    from vae.data import _sample_arrays

    x, y = _sample_arrays()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    folder.mkdir(parents=True, exist_ok=True)
    tr, te = idx[:n_train], idx[n_train : n_train + n_test]
    write_idx(folder / "train-images-idx3-ubyte", x[tr], gz)
    write_idx(folder / "train-labels-idx1-ubyte", y[tr], gz)
    write_idx(folder / "t10k-images-idx3-ubyte", x[te], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", y[te], gz)
    return folder
