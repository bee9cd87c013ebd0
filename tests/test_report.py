"""The report from a real (tiny) study: figures, self-contained HTML, summary, cache, and notes."""
from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from analysis import metrics as M
from analysis.report import Options, build
from conftest import run_cli
from study import results
from study.errors import StudyError


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory):
    storage = tmp_path_factory.mktemp("rep")
    r = run_cli("run", "--name", "g", "--storage", str(storage), "--grid", "latent_dim=2,4,8", "--epochs", "2",
                "--max-train-images", "600", "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return storage / "g"


def test_report_builds_every_figure(grid_study, tmp_path):
    out = tmp_path / "rep"
    index = build(grid_study, out, options=Options(tsne_points=300, gap_images=100, decoder_steps=20))
    text = index.read_text()
    for png in ("digits_mse.png", "digits_psnr.png", "loss_curves.png", "tsne.png", "recon_panel.png",
                "amortisation_gap.png", "traversals.png", "prior_samples.png", "rate_distortion.png",
                "optuna_history.png"):
        assert (out / png).stat().st_size > 5000, png
    # self-contained: images are inlined, nothing is fetched from a server or a relative path
    assert text.count("data:image/png;base64,") >= 10
    assert not re.search(r"<img[^>]+src=['\"](?!data:)", text)
    assert "not drawn" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["completed"] == 3 and summary["winner"]["trial_id"]
    gap = pd.DataFrame(summary["amortisation_gap"])
    assert len(gap) == 10 and (gap["decoder_only"] > 0).all()
    assert {r["latent_dim"] for r in summary.get("reference_comparison", [])} <= {5, 10, 15, 20}


def test_second_report_uses_the_cache(grid_study, tmp_path):
    out = tmp_path / "rep"
    opts = Options(tsne_points=300, gap_images=100, decoder_steps=20)
    t0 = time.perf_counter()
    build(grid_study, out, options=opts)
    first = time.perf_counter() - t0
    cached = list((out / "cache").glob("*.npz"))
    assert len(cached) == 1
    lines: list[str] = []
    build(grid_study, out, options=opts, printer=lines.append)
    assert any("from cache" in line for line in lines)
    assert first > 0


def test_missing_checkpoint_is_a_note_not_a_crash(grid_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(grid_study, copy, ignore=shutil.ignore_patterns("tune"))  # checkpoints gone
    index = build(copy, tmp_path / "out", options=Options(tsne_points=300, gap_images=100, decoder_steps=5))
    text = index.read_text()
    assert "figures that need the checkpoint are left out" in text and "is missing" in text
    assert (tmp_path / "out" / "digits_mse.png").exists() and not (tmp_path / "out" / "tsne.png").exists()


def test_single_latent_size_leaves_out_figure_one(tmp_path):
    r = run_cli("run", "--smoke", "--name", "one", "--storage", str(tmp_path), "--grid", "latent_dim=3",
                "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    index = build(tmp_path / "one", options=Options(tsne_points=100, gap_images=50, decoder_steps=5))
    assert "fewer than two latent sizes" in index.read_text()


def test_report_cli_errors(tmp_path):
    r = run_cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and "holds no study" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(StudyError, match="holds no study"):
        build(tmp_path)


def test_pareto_front_and_ranking():
    x = np.array([1.0, 2.0, 3.0, 1.5, 2.5])
    y = np.array([5.0, 3.0, 1.0, 6.0, 3.5])
    assert M.pareto_front(x, y).tolist() == [0, 1, 2]
    df = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["completed", "failed", "pruned"],
                       "objective": [3.0, 1.0, 2.0], "val_elbo": [3.0, 1.0, 2.0], "param_latent_dim": [4, 4, 8]})
    assert results.winner(df)["trial_id"] == "c"  # a failed trial never wins
    assert results.winners_by_latent(df)["trial_id"].tolist() == ["a", "c"]


def test_kl_per_dimension_marks_inactive():
    rng = np.random.default_rng(0)
    mu = np.stack([rng.normal(0, 2, 500), np.zeros(500)], 1)
    logvar = np.stack([np.full(500, -2.0), np.zeros(500)], 1)
    plan = M.traversal_plan(mu, logvar)
    assert plan.order.tolist() == [0, 1] and plan.active.tolist() == [True, False]
