"""A pack (``vae.pack``): K MLP beta-VAEs trained as one stacked model. A member trained in a pack
equals the same configuration trained alone by ``vae.train.fit``; masking a member's d to the
pack's largest is the smaller model; a member that leaves leaves the others' training unchanged."""
from __future__ import annotations

import pytest
import torch

from vae.config import ConfigError, TrainConfig
from vae.model import BetaVAE
from vae.pack import Pack, PackedMLP, check_packable, fit_pack
from vae.train import fit

# Relative tolerance on a validation -ELBO: the pack sums a loss in another order than fit does
# (per member, then over the batch), and Adam's fused kernel rounds otherwise than its arithmetic here.
REL = 2e-4


def _configs(**shared):
    base = dict(dataset="mnist-sample", max_train_images=400, epochs=3, batch_size=32, hidden=64, **shared)
    return [TrainConfig(latent_dim=4, beta=1.0, lr=1e-3, seed=0, augment="none", **base),
            TrainConfig(latent_dim=8, beta=0.5, lr=2e-3, seed=1, augment="shift", **base),
            TrainConfig(latent_dim=6, beta=2.0, lr=5e-4, seed=2, augment="none", lr_schedule="cosine", **base)]


def test_a_member_trained_in_a_pack_equals_its_configuration_trained_alone(sample_data):
    configs = _configs()
    packed = fit_pack(configs, sample_data)
    for c, member in zip(configs, packed):
        alone = fit(c, sample_data)
        assert member.status == "completed" and len(member.history) == c.epochs
        for a, b in zip(alone.history, member.history):
            for key in ("train_loss", "val_elbo", "val_recon", "val_kl", "val_mse"):
                assert b[key] == pytest.approx(a[key], rel=REL), (c.latent_dim, a["epoch"], key, a[key], b[key])
        assert member.best_epoch == alone.best_epoch
        assert member.model.latent_dim == c.latent_dim


def test_masking_d_to_the_packs_largest_is_the_smaller_model():
    torch.manual_seed(0)
    small, large = BetaVAE("mlp", 3, 32), BetaVAE("mlp", 9, 32)
    pack = PackedMLP.from_models([small, large])
    assert pack.mask.shape == (2, 1, 9) and pack.mask[0, 0].tolist() == [1.0] * 3 + [0.0] * 6
    for name, p in pack.member(0).state_dict().items():
        assert torch.equal(p, small.state_dict()[name]), name
    x = torch.rand(2, 5, 784)
    mu, logvar = pack.encode(x)
    want_mu, want_logvar = small.encode(x[0].reshape(5, 1, 28, 28))
    assert torch.allclose(mu[0, :, :3], want_mu, atol=1e-6) and torch.allclose(logvar[0, :, :3], want_logvar, atol=1e-6)
    assert not mu[0, :, 3:].any() and not logvar[0, :, 3:].any()  # past d: 0, so z = 0 there and its KL is 0
    z = torch.zeros(2, 5, 9)
    z[0, :, :3] = torch.randn(5, 3)
    assert torch.allclose(pack.decode(z)[0], small.decode(z[0, :, :3]).reshape(5, 784), atol=1e-6)
    # the masked weights never move: their gradient is 0
    (pack.decode(pack.reparameterize(mu, logvar, torch.randn_like(mu)))[0].sum() + logvar.sum()).backward()
    assert not pack.dec_fc_w.grad[0, 3:].any() and not pack.enc_mu_w.grad[0, :, 3:].any()


def test_a_member_that_leaves_leaves_the_others_unchanged(sample_data):
    configs = _configs()
    whole = Pack(configs, sample_data)
    cut = Pack(configs, sample_data)
    for epoch in range(1, 4):
        a = whole.run_epoch()
        if epoch == 2:
            cut.drop([1])  # pruned after its first epoch
        b = cut.run_epoch()
        assert set(b) == ({0, 1, 2} if epoch == 1 else {0, 2})
        for k in b:
            assert b[k]["val_elbo"] == pytest.approx(a[k]["val_elbo"], rel=1e-5), (epoch, k)
    assert cut.results[1].status == "dropped" and len(cut.results[1].history) == 1
    assert cut.model.enc_fc_w.shape[0] == 2  # it no longer costs compute


def test_what_cannot_share_a_pack_is_refused():
    base = dict(dataset="mnist-sample", epochs=2)
    with pytest.raises(ConfigError, match="only the mlp architecture"):
        check_packable([TrainConfig(arch="conv", **base)])
    with pytest.raises(ConfigError, match="differ in hidden, batch_size"):
        check_packable([TrainConfig(**base), TrainConfig(hidden=64, batch_size=64, **base)])
