"""The report from a real (tiny) study: figures, self-contained HTML, summary, cache, and notes."""
from __future__ import annotations

import json
import re
import shutil

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
    (storage / "run.txt").write_text(r.stdout)
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
    assert "reference_comparison" not in summary  # d = 2, 4, 8: no size the reference has


def test_second_report_uses_the_cache(grid_study, tmp_path):
    out = tmp_path / "rep"
    opts = Options(tsne_points=300, gap_images=100, decoder_steps=20)
    build(grid_study, out, options=opts)
    cached = list((out / "cache").glob("*.npz"))
    assert len(cached) == 1
    lines: list[str] = []
    build(grid_study, out, options=opts, printer=lines.append)
    assert any("from cache" in line for line in lines)
    assert not any("latent means" in line for line in lines)  # the t-SNE was not recomputed


def test_reference_comparison_compares_like_with_like():
    rng = np.random.default_rng(0)
    sizes = [5, 10, 15, 20]
    mean = pd.DataFrame({d: rng.uniform(0.005, 0.03, 10) for d in sizes}, index=range(10))
    sample = mean * 1.2
    sample.loc[3, 15] = 0.5  # the sampled row's worst digit at d=15 is 3, while the mean row's is not
    ref = M.reference_comparison(mean, sample).set_index("latent_dim")
    assert ref.index.tolist() == sizes
    assert ref.loc[15, "reference_sample_mse"] == 0.00908 and ref.loc[15, "reference_sample_psnr"] == 20.77
    assert ref.loc[15, "reference_sample_worst"] == "8: 0.01312"
    assert ref.loc[15, "ours_sample_worst"] == "3: 0.50000"
    assert ref.loc[15, "ours_mean_worst"] == f"{int(mean[15].idxmax())}: {mean[15].max():.5f}"
    assert ref.loc[10, "ours_sample_mse"] == pytest.approx(sample[10].mean())
    assert ref.loc[10, "ours_mean_psnr"] == pytest.approx((10 * np.log10(1 / mean[10])).mean())
    assert M.reference_comparison(mean[[5]].rename(columns={5: 7})).empty  # no shared size


def test_missing_checkpoint_is_a_note_not_a_crash(grid_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(grid_study, copy, ignore=shutil.ignore_patterns("tune"))  # checkpoints gone
    index = build(copy, tmp_path / "out", options=Options(tsne_points=300, gap_images=100, decoder_steps=5))
    text = index.read_text()
    assert "figures that need the checkpoint are left out" in text and "is missing" in text
    assert (tmp_path / "out" / "digits_mse.png").exists() and not (tmp_path / "out" / "tsne.png").exists()


@pytest.mark.slow
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


def test_loss_curves_draw_every_other_trial_behind_the_winner():
    """Every other trial's validation curve, in epoch order, as one artist per panel (a line
    each took 17 s for 10,000 trials)."""
    from matplotlib.collections import LineCollection

    from analysis.figures import plot_loss_curves

    rows = []
    for t, n in (("w", 4), ("a", 3), ("b", 1), ("c", 2)):
        for e in range(n, 0, -1):  # out of order
            rows.append({"trial_id": t, "epoch": e, "train_recon": 100.0 + e, "train_kl": 5.0, "val_elbo": 200.0 - e,
                         "val_recon": 150.0 - e, "val_kl": 10.0 + e + (t == "a")})
    fig = plot_loss_curves(pd.DataFrame(rows), "w")
    for ax, col in zip(fig.axes, ("val_elbo", "val_recon", "val_kl")):
        (others,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        want = {t: [(e, r[col]) for e in range(1, n + 1) for r in rows if r["trial_id"] == t and r["epoch"] == e]
                for t, n in (("a", 3), ("b", 1), ("c", 2))}
        assert [seg.tolist() for seg in others.get_segments()] == [[list(p) for p in want[t]] for t in "abc"]
        assert ax.get_ylim()[0] <= min(r[col] for r in rows) and ax.get_ylim()[1] >= max(r[col] for r in rows)


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


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(grid_study, tmp_path):
    """The report as a user sees it: every figure in the page decodes (naturalWidth > 0), and a
    screenshot of the page is not blank."""
    import subprocess

    from conftest import require

    require(_chromium() is not None, "Debian's chromium (apt-get install chromium)")
    out = tmp_path / "rep"
    index = build(grid_study, out, options=Options(tsne_points=300, gap_images=100, decoder_steps=5))
    probe = out / "probe.html"
    probe.write_text(index.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { const im = [...document.images]; "
        "document.title = 'imgs:' + im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length; });"
        "</script></body>")))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>imgs:(\d+)/(\d+)</title>", dom.stdout)
    assert m, (dom.stdout[:500], dom.stderr[-1500:])
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total >= 10 and loaded == total
    # the comparison with the reference project says, before its numbers, why it is not like for like
    page = dom.stdout
    note, table = page.find("Not like for like"), page.find("reference d = 15 (posterior_sample)")
    assert 0 < note < table, (note, table)
    assert "trained on 600 images, 80x fewer" in page and "--objective val_mse" in page
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, "--window-size=1200,2400", f"--screenshot={shot}", index.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-1500:]
    import matplotlib.image as mpimg

    px = mpimg.imread(str(shot))[..., :3]
    ink = (px.mean(axis=2) < 0.9).mean()  # share of pixels that are not near-white
    assert px.std() > 0.05 and ink > 0.02, (px.std(), ink)


def test_figures_leave_the_callers_backend_and_pyplot_alone():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; import numpy as np; "
            "from analysis import figures as F; ax = F.plot_tsne(np.random.rand(20, 2), np.arange(20) % 10); "
            "print(matplotlib.get_backend(), len(plt.get_fignums()), type(ax.figure).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["svg", "0", "Figure"]


def test_winner_data_round_trips_through_the_cache_format():
    from analysis import compute as C

    rng = np.random.default_rng(0)
    plan = M.traversal_plan(rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) - 2)
    gap = pd.DataFrame({"recon_mode": ["posterior_mean", "decoder_only"], "digit": [0, 0], "n_images": [5, 5],
                        "mse": [0.02, 0.01], "psnr": [17.0, 20.0]})
    data = C.WinnerData(
        C.TsneData(rng.normal(size=(20, 2)), np.arange(20) % 10, 3, 1.5),
        C.PanelData(np.arange(10), np.arange(10) * 7, rng.random((10, 28, 28)),
                    {m: rng.random((10, 28, 28)) for m in C.PANEL_MODES}, {m: rng.random(10) for m in C.PANEL_MODES}, 10),
        C.GapData(gap, 150, 5),
        C.TraversalData(rng.random((3, 9, 28, 28)), plan, rng.random(3)),
        rng.random((64, 28, 28)))
    buf = __import__("io").BytesIO()
    np.savez_compressed(buf, **C.to_arrays(data))
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        back = C.from_arrays({k: z[k] for k in z.files})
    assert back.tsne.seed == 3 and back.tsne.seconds == 1.5 and np.array_equal(back.tsne.embedding, data.tsne.embedding)
    assert set(back.panel.recon) == set(C.PANEL_MODES) and np.array_equal(back.panel.mse["decoder_only"],
                                                                          data.panel.mse["decoder_only"])
    pd.testing.assert_frame_equal(back.gap.per_digit, gap)
    assert np.array_equal(back.traversals.plan.order, plan.order) and back.gap.steps == 150


def test_what_differs_from_the_reference_is_said_and_how_to_compare_like_for_like(grid_study):
    from vae.config import TrainConfig
    from vae.data import train_images

    assert train_images(TrainConfig()) == 3200 and train_images(TrainConfig(dataset="mnist")) == 48000
    assert train_images(TrainConfig(max_train_images=600)) == 600
    note = M.reference_note(objective="val_elbo", train_images=3200, epochs=15, arch="mlp")
    assert "validation -ELBO" in note and "3,200 images, 15x fewer" in note and M.LIKE_FOR_LIKE in note
    assert "seed-replication" in note and "epochs" not in note.split("Ranked")[0]
    recon = M.reference_note(objective="val_mse", train_images=3200, epochs=30, arch="mlp")
    assert "-ELBO" not in recon and M.LIKE_FOR_LIKE not in recon and "seed-replication" in recon
    assert M.reference_note(objective="val_mse", train_images=48000, epochs=15, arch="conv") is None
    assert M.reference_line(objective="val_recon", train_images=3200) is None
    # the run's own summary says it in one line (an -ELBO study on 600 images)
    lines = [ln for ln in (grid_study.parent / "run.txt").read_text().splitlines() if ln.startswith("note: ranked")]
    assert len(lines) == 1 and ", and trained on 600 images (the reference: 48,000)" in lines[0] and "--objective val_mse" in lines[0]
