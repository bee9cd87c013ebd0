from __future__ import annotations

import json

import pytest

from conftest import make_idx_folder, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_cli("train", "--dataset", "mnist-sample", "--latent-dim", "6", "--epochs", "2",
                "--max-train-images", "400", "--out", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_train_json(trained):
    assert trained["status"] == "completed" and trained["epochs_run"] == 2
    assert trained["images_per_second"] > 0 and trained["checkpoint"].endswith("model.pt")
    assert trained["val_elbo"] > 0 and trained["config"]["latent_dim"] == 6


def test_evaluate_json_shape(trained):
    r = run_cli("evaluate", trained["checkpoint"], "--split", "test", "--format", "json", "--decoder-steps", "10")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split"] == "test" and out["n_images"] == 1000 and out["neg_elbo"] > 0
    assert set(out["modes"]) == {"posterior_mean", "posterior_sample", "decoder_only"}
    for mode in out["modes"].values():
        assert [d["digit"] for d in mode["per_digit"]] == list(range(10))
        assert [d["n_images"] for d in mode["per_digit"]] == [100] * 10
        assert {"mean_mse", "mean_psnr"} <= set(mode)


def test_evaluate_table_has_all_modes(trained):
    r = run_cli("evaluate", trained["checkpoint"], "--modes", "posterior_mean", "decoder_only",
                "--decoder-steps", "5")
    assert r.returncode == 0, r.stderr
    assert "posterior_mean MSE" in r.stdout and "decoder_only MSE" in r.stdout and "mean" in r.stdout


def test_evaluate_on_other_idx_dataset(trained, tmp_path):
    folder = make_idx_folder(tmp_path / "idx", n_train=100, n_test=50)
    r = run_cli("evaluate", trained["checkpoint"], "--dataset", "mnist", "--data-dir", str(folder),
                "--modes", "posterior_mean", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_images"] == 50


BAD_TRAIN = [
    (["--latent-dim", "0"], "latent_dim=0"),
    (["--latent-dim", "100000"], "latent_dim=100000"),
    (["--beta", "0"], "beta=0.0"),
    (["--beta", "-2"], "beta=-2.0"),
    (["--lr", "0"], "lr=0.0"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--epochs", "0"], "epochs=0"),
    (["--arch", "resnet"], "arch='resnet'"),
    (["--dataset", "cifar10"], "dataset='cifar10'"),
    (["--latent-dim", "abc"], "invalid int value"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--device", "tpu"], "device='tpu'"),
]


def test_device_cuda_trains_on_the_gpu_or_says_there_is_none(tmp_path):
    import torch

    r = run_cli("train", "--max-train-images", "100", "--epochs", "1", "--out", str(tmp_path / "o"),
                "--device", "cuda", "--format", "json")
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["device"].startswith("cuda")
    else:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "no CUDA GPU is visible" in lines[0], r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, words", BAD_TRAIN)
def test_bad_train_input_is_one_line_exit_2(tmp_path, flags, words):
    out = tmp_path / "out"
    r = run_cli("train", "--max-train-images", "100", "--out", str(out), *flags)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


def test_bad_checkpoints(tmp_path):
    r = run_cli("evaluate", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    r = run_cli("evaluate", str(tmp_path / "bad.pt"))
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "evaluate", str(tmp_path / "missing.pt"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_every_command_has_help():
    from study.cli import build_parser

    def commands(parser, path=()):  # every command, those under a group (`cluster local`) too
        for action in parser._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for name, p in action.choices.items():
                    yield (*path, name), p
                    yield from commands(p, (*path, name))

    found = list(commands(build_parser()))
    assert {("cluster", "local"), ("cluster", "aws-setup"), ("run",)} <= {path for path, _ in found}
    for path, p in found:
        assert p.description and "Example" in p.description, path
        r = run_cli(*path, "--help")
        assert r.returncode == 0 and "usage" in r.stdout, path


def test_python_dash_m_and_console_script_agree():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "vae-study"
    assert exe.exists(), "the console script is installed by pip install -e ."
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout
