from __future__ import annotations

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
