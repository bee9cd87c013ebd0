from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from vae import checkpoint
from vae.config import TrainConfig
from vae.evaluate import MODES, evaluate_split, mse_per_image, optimise_latents, decode_probs, representative_indices
from vae.train import fit


def test_one_epoch_smoke_loss_falls(sample_data):
    config = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=8, batch_size=32, max_train_images=400)
    seen = []
    # Loss per batch within the single epoch: compare the first and last few steps.
    result = fit(config, sample_data, on_epoch=lambda m, state: seen.append((m, state.is_best)))
    assert result.status == "completed" and result.best_epoch == 1
    m = seen[0][0]
    for key in ("train_loss", "train_recon", "train_kl", "val_elbo", "val_recon", "val_kl", "val_mse",
                "seconds", "images_per_second"):
        assert math.isfinite(m[key]), key
    untrained = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=8, max_train_images=400, lr=1e-12)
    baseline = fit(untrained, sample_data).history[0]["val_elbo"]
    assert m["val_elbo"] < baseline - 50  # one epoch of learning beats an untrained net by far


def test_training_is_seeded(sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=2, latent_dim=4, max_train_images=400, seed=5)
    a, b = fit(c, sample_data), fit(c, sample_data)
    assert a.history[-1]["val_elbo"] == b.history[-1]["val_elbo"]
    other = fit(c.replace(seed=6), sample_data)
    assert other.history[-1]["val_elbo"] != a.history[-1]["val_elbo"]


def test_best_epoch_weights_are_kept(sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=3, latent_dim=4, max_train_images=400)
    r = fit(c, sample_data)
    best = min(r.history, key=lambda h: h["val_elbo"])
    assert r.best_epoch == best["epoch"]
    from vae.train import evaluate_loss

    again = evaluate_loss(r.model, sample_data.val.pixels(), c.beta)
    assert again["elbo"] == pytest.approx(best["val_elbo"], rel=1e-5)


def test_nan_loss_fails_cleanly(sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=3, latent_dim=4, max_train_images=400, lr=9.0, beta=1e6)
    r = fit(c, sample_data)
    assert r.status == "failed"
    assert "non-finite" in r.error and "lower lr" in r.error


def test_evaluate_shape_and_counts(sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=4, max_train_images=400)
    r = fit(c, sample_data)
    out = evaluate_split(r.model, sample_data.test, decoder_steps=20)
    assert set(out["modes"]) == set(MODES)
    counts = np.bincount(sample_data.test.labels.numpy(), minlength=10)
    for mode in MODES:
        rows = out["modes"][mode]["per_digit"]
        assert [row["n_images"] for row in rows] == counts.tolist()
        assert out["modes"][mode]["mean_mse"] == pytest.approx(np.mean([row["mse"] for row in rows]))
    assert out["n_images"] == len(sample_data.test) and out["neg_elbo"] > 0
    assert out["modes"]["decoder_only"]["steps"] == 20


def test_decoder_only_beats_unoptimised_z(sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=2, latent_dim=6, max_train_images=400)
    model = fit(c, sample_data).model
    x = sample_data.test.pixels()[:200]
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn((200, 6), generator=gen)
    before = mse_per_image(decode_probs(model, z0), x).mean()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    z = optimise_latents(model, x, steps=60, z0=z0)
    after = mse_per_image(decode_probs(model, z), x).mean()
    assert after < 0.8 * before
    # and the decoder's weights were not touched: every tensor equal, bit for bit
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_posterior_mean_row_is_a_real_reconstruction(sample_data):
    # The reference project's "VAE" row was the input itself; ours must differ from it.
    c = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=4, max_train_images=400)
    model = fit(c, sample_data).model
    from vae.evaluate import reconstruct

    x = sample_data.test.pixels()[:50]
    rec = reconstruct(model, x, "posterior_mean")
    assert rec.shape == x.shape and mse_per_image(rec, x).min() > 1e-4


def test_representative_indices_deterministic(sample_data):
    a = representative_indices(sample_data.test, k=5)
    b = representative_indices(sample_data.test, k=5)
    assert a == b and sorted(a) == list(range(10))
    labels = sample_data.test.labels.numpy()
    for d, idx in a.items():
        assert len(idx) == min(5, int((labels == d).sum())) and all(labels[i] == d for i in idx)


def test_checkpoint_roundtrip_and_errors(tmp_path, sample_data):
    c = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=4, max_train_images=400)
    r = fit(c, sample_data)
    path = checkpoint.save(tmp_path / "m.pt", r.model, c, epoch=1)
    model, cfg, payload = checkpoint.load(path)
    assert cfg == c and payload["epoch"] == 1 and "torch" in payload["versions"]
    x = sample_data.test.pixels()[:4]
    torch.testing.assert_close(model.encode(x)[0], r.model.eval().encode(x)[0])
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "bad.pt")
    # a checkpoint whose weights do not fit its stated architecture
    payload = torch.load(path, weights_only=True)
    payload["config"]["arch"] = "conv"
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(checkpoint.CheckpointError, match="does not fit its architecture"):
        checkpoint.load(tmp_path / "mismatch.pt")


def test_pickled_objects_are_never_loaded(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": checkpoint.FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="pickled"):
        checkpoint.load(tmp_path / "evil.pt")


# --------------------------------------------------------------------------- quality levers

def test_lr_schedules_start_end_and_warm_up():
    from vae.train import lr_at

    total = 1000
    assert [lr_at("constant", 1e-3, s, total) for s in (0, 500, 999)] == [1e-3] * 3
    assert lr_at("cosine", 1e-3, 0, total) == pytest.approx(1e-3)
    assert lr_at("cosine", 1e-3, 500, total) == pytest.approx(5e-4)
    assert lr_at("cosine", 1e-3, total, total) == pytest.approx(0.0, abs=1e-12)
    cos = [lr_at("cosine", 1e-3, s, total) for s in range(total)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))  # never rises
    assert lr_at("onecycle", 1e-3, 0, total) == pytest.approx(1e-3 / 25)
    assert lr_at("onecycle", 1e-3, 300, total) == pytest.approx(1e-3)  # the peak, after 30% of the steps
    one = [lr_at("onecycle", 1e-3, s, total) for s in range(total)]
    assert max(one) == pytest.approx(1e-3) and one.index(max(one)) == 300
    assert one[-1] < 1e-7


def test_shift_augmentation_moves_whole_pixels_within_one(sample_data):
    from vae.train import augment_batch

    x = sample_data.train.pixels()[:64]
    gen = torch.Generator().manual_seed(3)
    y = augment_batch(x, "shift", gen)
    assert y.shape == x.shape and augment_batch(x, "none", gen) is x
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    moved = 0
    for i in range(x.shape[0]):
        # y[i] must equal x[i] moved by (dy, dx) in {-1, 0, 1}^2, with background coming in
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.allclose(y[i, 0], padded[i, 0, 1 - dy:29 - dy, 1 - dx:29 - dx], atol=1e-5)]
        assert matches, f"image {i} is not a whole-pixel shift of its input"
        moved += matches[0] != (0, 0)
    assert moved > 32  # 8 of 9 offsets move the image
    again = augment_batch(x, "shift", torch.Generator().manual_seed(3))
    assert torch.equal(again, y)  # drawn from the generator alone


def test_affine_augmentation_changes_images_and_keeps_range(sample_data):
    from vae.train import augment_batch

    x = sample_data.train.pixels()[:32]
    y = augment_batch(x, "affine", torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
    assert float((y - x).abs().mean()) > 0.01


def test_augmentation_trains_on_moved_images_only(sample_data):
    """Validation sees the images as they are: the same weights give the same val -ELBO whether
    the run trained with augmentation or not, and training does differ."""
    base = TrainConfig(dataset="mnist-sample", epochs=1, latent_dim=4, max_train_images=400, augment="none")
    a = fit(base, sample_data)
    b = fit(base.replace(augment="shift"), sample_data)
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]
    from vae.train import evaluate_loss

    assert evaluate_loss(b.model, sample_data.val.pixels(), 1.0)["elbo"] == pytest.approx(b.history[0]["val_elbo"], rel=1e-5)


@pytest.mark.parametrize("change", [{"lr_schedule": "cosine"}, {"lr_schedule": "onecycle", "augment": "affine"}])
def test_resumed_run_with_schedule_and_augmentation_is_exact(sample_data, change):
    """A run continued from epoch 2's state trains epochs 3-4 exactly as the uninterrupted run."""
    c = TrainConfig(dataset="mnist-sample", epochs=4, latent_dim=4, max_train_images=400, **change)
    full = fit(c, sample_data)
    saved = {}

    def stop_after_two(m, state):
        if m["epoch"] == 2:
            saved["model"] = copy.deepcopy(state.model)
            saved["opt"] = copy.deepcopy(state.optimizer.state_dict())
            saved["best"] = (state.best_score, state.best_epoch)
            return False

    fit(c, sample_data, on_epoch=stop_after_two)
    rest = fit(c, sample_data, model=saved["model"], optimizer_state=saved["opt"], start_epoch=3,
               best_score=saved["best"][0], best_epoch=saved["best"][1])
    for a, b in zip(full.history[2:], rest.history):
        assert a["epoch"] == b["epoch"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_elbo"] == pytest.approx(b["val_elbo"], rel=1e-6)


def test_the_best_epoch_follows_the_selected_metric(sample_data):
    """At beta 0.002 the -ELBO is best at epoch 1 and rises while the MSE keeps falling: selecting by
    val_mse keeps the lowest-MSE epoch's weights, the default still the lowest -ELBO's."""
    from vae.train import best_epoch, evaluate_loss

    c = TrainConfig(dataset="mnist-sample", epochs=4, latent_dim=32, beta=0.002, lr=3e-3, max_train_images=1200)
    by_mse, by_elbo = fit(c, sample_data, select="val_mse"), fit(c, sample_data)
    assert [h["val_mse"] for h in by_mse.history] == [h["val_mse"] for h in by_elbo.history]  # the same run
    mse = [h["val_mse"] for h in by_mse.history]
    elbo = [h["val_elbo"] for h in by_elbo.history]
    assert by_mse.best_epoch == 1 + mse.index(min(mse)) != by_elbo.best_epoch == 1 + elbo.index(min(elbo))
    x_val = sample_data.val.pixels()
    assert evaluate_loss(by_mse.model, x_val, c.beta)["mse"] == pytest.approx(min(mse), rel=1e-5)
    assert evaluate_loss(by_elbo.model, x_val, c.beta)["elbo"] == pytest.approx(min(elbo), rel=1e-5)
    assert best_epoch(by_mse.history, "val_mse")["epoch"] == by_mse.best_epoch
    assert best_epoch(by_mse.history, "val_mse", "max")["epoch"] == 1 + mse.index(max(mse))
    with pytest.raises(ValueError, match="select='val_loss'"):
        fit(c, sample_data, select="val_loss")


def test_a_run_resumed_by_its_selected_metric_is_exact(sample_data):
    """Resumed from epoch 2's state with state.best_score, a run selecting by val_mse ends with the
    uninterrupted run's best epoch and weights."""
    c = TrainConfig(dataset="mnist-sample", epochs=4, latent_dim=32, beta=0.002, lr=3e-3, max_train_images=1200)
    full = fit(c, sample_data, select="val_mse")
    saved = {}

    def stop_after_two(m, state):
        if m["epoch"] == 2:
            saved.update(model=copy.deepcopy(state.model), opt=copy.deepcopy(state.optimizer.state_dict()),
                         best=(state.best_score, state.best_epoch))
            return False

    fit(c, sample_data, on_epoch=stop_after_two, select="val_mse")
    assert saved["best"][0] == pytest.approx(min(h["val_mse"] for h in full.history[:2]))
    rest = fit(c, sample_data, model=saved["model"], optimizer_state=saved["opt"], start_epoch=3,
               best_score=saved["best"][0], best_epoch=saved["best"][1], select="val_mse")
    assert rest.best_epoch == full.best_epoch
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, rest.model.state_dict()[k], rtol=1e-5, atol=1e-6), k


def test_deeper_mlp_and_pytorch_examples_names():
    from vae.model import BetaVAE, count_parameters

    one, two = BetaVAE("mlp", 20, 400, 1), BetaVAE("mlp", 20, 400, 2)
    assert count_parameters(two) - count_parameters(one) == 2 * (400 * 400 + 400)
    assert not any("deeper" in k for k in one.state_dict())  # layers=1 keeps the examples' parameter names
    assert two(torch.rand(3, 1, 28, 28))[0].shape == (3, 1, 28, 28)


def test_keep_last_returns_the_last_epochs_weights(sample_data):
    from vae.train import evaluate_loss

    c = TrainConfig(dataset="mnist-sample", epochs=3, latent_dim=4, max_train_images=400)
    r = fit(c, sample_data, keep="last")
    assert r.best_epoch == 3
    last = evaluate_loss(r.model, sample_data.val.pixels(), c.beta)["elbo"]
    assert last == pytest.approx(r.history[-1]["val_elbo"], rel=1e-5)


def test_train_and_val_adds_the_validation_images(sample_data):
    merged = sample_data.train_and_val()
    assert len(merged.train) == len(sample_data.train) + len(sample_data.val)
    assert set(merged.train.index.tolist()) == set(sample_data.train.index.tolist()) | set(sample_data.val.index.tolist())
    assert merged.test is sample_data.test
