"""The replay of recorded learning curves (benchmarks/curves.py) and the paired test of
benchmarks/bench_peers.py: what the search's comparisons in BENCHMARKS §1e rest on."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_peers  # noqa: E402
import curves  # noqa: E402


def _table(tmp_path: Path) -> Path:
    rows = []
    for i, params in enumerate(({"beta": 0.01, "latent_dim": 2, "lr": 1e-4}, {"beta": 1.0, "latent_dim": 16, "lr": 1e-3},
                                {"beta": 10.0, "latent_dim": 64, "lr": 3e-3})):
        rows.append({"params": params, "seconds": 1.0,
                     "epochs": [{"epoch": e, "val_elbo": 200.0 - 10 * i - e, "val_mse": 0.05 - 0.001 * e}
                                for e in range(1, 4)]})
    path = tmp_path / "curves.json"
    path.write_text(json.dumps({"epochs": 3, "space": curves.SPACE, "rows": rows}))
    return path


def test_unit_coordinates_round_trip_on_the_space_own_scale():
    for p in ({"beta": 0.3, "latent_dim": 17, "lr": 5e-4}, {"beta": 0.01, "latent_dim": 2, "lr": 1e-4}):
        u = curves.to_unit(p)
        assert all(0.0 <= x <= 1.0 for x in u)
        back = curves.from_unit(u)
        assert back["latent_dim"] == p["latent_dim"]
        assert math.isclose(back["beta"], p["beta"], rel_tol=1e-9) and math.isclose(back["lr"], p["lr"], rel_tol=1e-9)
    assert curves.to_unit({"beta": 0.1, "latent_dim": 33, "lr": 3e-3}) == pytest.approx([1 / 3, 0.5, 1.0])


def test_nearest_is_measured_on_the_log_scale_and_best_reads_every_epoch(tmp_path):
    table = curves.Table(_table(tmp_path))
    # beta 0.5 is nearer 1.0 than 0.01 on a log scale (and on a linear one 0.01 would be nearer)
    assert table.nearest({"beta": 0.5, "latent_dim": 20, "lr": 8e-4})["params"]["latent_dim"] == 16
    assert table.nearest({"beta": 0.012, "latent_dim": 3, "lr": 1.1e-4})["params"]["latent_dim"] == 2
    assert table.best("val_elbo") == 200.0 - 20 - 3


def test_replay_keeps_fit_contract_resume_and_stop(tmp_path, monkeypatch):
    import vae.train
    from vae.config import TrainConfig

    monkeypatch.setattr(vae.train, "fit", vae.train.fit)  # put back after the test: install() replaces it
    monkeypatch.setattr(curves, "PACE_S", 0.0)
    curves.install(_table(tmp_path))

    assert vae.train.fit is curves.replay_fit
    tc = TrainConfig(dataset="mnist-sample", latent_dim=16, beta=1.0, lr=1e-3, epochs=3, seed=0)
    seen = []
    result = vae.train.fit(tc, None, on_epoch=lambda m, s: seen.append((m["epoch"], m["val_elbo"], s.is_best)))
    assert seen == [(1, 189.0, True), (2, 188.0, True), (3, 187.0, True)]
    assert result.best_epoch == 3 and len(result.history) == 3
    seen.clear()  # a resumed trial continues at start_epoch; on_epoch returning False stops it
    vae.train.fit(tc, None, on_epoch=lambda m, s: seen.append(m["epoch"]) or False, start_epoch=2,
                  best_score=188.0, best_epoch=2)
    assert seen == [2]


def test_paired_counts_never_as_budget_plus_one_and_matches_wilcoxon():
    from scipy.stats import wilcoxon

    ours = {str(s): {"to_target": v} for s, v in enumerate([10, 20, None, 40, 50, 60])}
    theirs = {str(s): {"to_target": v} for s, v in enumerate([15, 20, 100, None, 70, 90])}
    r = bench_peers.paired(ours, theirs, "to_target", never=241)
    diffs = [-5, 0, 141, 40 - 241, -20, -30]
    assert r["seeds"] == 6 and r["ours_better"] == 4 and r["ours_worse"] == 1
    assert r["median_diff"] == pytest.approx(sorted(diffs)[2] / 2 + sorted(diffs)[3] / 2)
    assert r["p"] == pytest.approx(wilcoxon([d for d in diffs if d]).pvalue)
    assert bench_peers.paired(ours, {"99": {"to_target": 1}}, "to_target", never=241) is None
