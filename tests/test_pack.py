"""A pack (``vae.pack``): K MLP beta-VAEs trained as one stacked model. A member trained in a pack
equals the same configuration trained alone by ``vae.train.fit``; masking a member's d to the
pack's largest is the smaller model; a member that leaves leaves the others' training unchanged."""
from __future__ import annotations

import pytest
import torch

from vae.config import ConfigError, TrainConfig
from vae.model import BetaVAE
from vae.pack import Pack, PackedMLP, check_packable, evaluate_stacked, fit_pack, stacked_model
from vae.train import evaluate_loss, fit

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


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_stacked_validation_equals_each_members_own(arch, monkeypatch):
    """All members validated in one stacked pass (two evaluation batches, several image chunks,
    two members sharing a d and its noise) give each member's ``evaluate_loss``."""
    import vae.pack as pack_module
    import vae.train as train_module

    monkeypatch.setattr(pack_module, "EVAL_BATCH", 48)
    monkeypatch.setattr(train_module, "EVAL_BATCH", 48)
    monkeypatch.setattr(pack_module, "EVAL_MEMBER_IMAGES", {"mlp": 80})
    monkeypatch.setattr(pack_module, "EVAL_MEMBER_IMAGES_OTHER", 80)
    dims, betas = [3, 7, 3, 5], [1.0, 0.3, 2.0, 4.0]
    torch.manual_seed(0)
    singles = [BetaVAE(arch, d, 32) for d in dims]
    stacked = stacked_model(arch, dims, 32, 1)
    with torch.no_grad():
        for k, m in enumerate(singles):
            for name, p in stacked.named_parameters():  # each member's own weights, small ones 0-padded
                src = m.state_dict()
                if arch == "mlp":
                    layer, kind = name.rsplit("_", 1)
                    linear = dict(pack_module._linears(m))[layer]
                    t = linear.weight.T if kind == "w" else linear.bias.view(1, -1)
                else:
                    t = src[name.replace("__", ".")]
                p[(k, *(slice(0, n) for n in t.shape))] = t
    x = torch.rand(100, 1, 28, 28)
    got = evaluate_stacked(stacked, x, betas)
    for m, beta, g in zip(singles, betas, got):
        want = evaluate_loss(m, x, beta)
        for key in ("loss", "elbo", "recon", "kl", "mse"):
            assert g[key] == pytest.approx(want[key], rel=1e-5), (arch, m.latent_dim, key)


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
    with pytest.raises(ConfigError, match="differ in arch"):
        check_packable([TrainConfig(**base), TrainConfig(arch="conv", **base)])
    with pytest.raises(ConfigError, match="differ in hidden, batch_size"):
        check_packable([TrainConfig(**base), TrainConfig(hidden=64, batch_size=64, **base)])


def test_members_join_at_their_own_epochs_and_each_equals_its_run_alone(sample_data):
    """Continuous batching: a member that joins while others are at epoch 2 trains its epoch 1
    beside their epoch 3; each still equals its configuration trained alone."""
    from vae.pack import PackTrainer

    configs = _configs()
    trainer = PackTrainer(sample_data)
    trainer.add("a", configs[0])
    trainer.add("b", configs[1])
    got = {"a": [], "b": [], "c": []}
    for r in range(5):
        if r == 2:
            trainer.add("c", configs[2])
        asked = [k for k in ("a", "b", "c") if k in trainer.members and trainer.members[k].status == "training"]
        for k, m in trainer.round(asked).items():
            got[k].append(m)
    for key, c in zip(("a", "b", "c"), configs):
        alone = fit(c, sample_data)
        assert [m["epoch"] for m in got[key]] == [1, 2, 3]
        for a, b in zip(alone.history, got[key]):
            assert b["val_elbo"] == pytest.approx(a["val_elbo"], rel=REL), (key, a["epoch"])


def test_a_member_moves_between_fit_and_a_pack_through_a_checkpoint(sample_data):
    """fit's state after epoch 1 joins a pack, whose snapshot after epoch 2 resumes fit for epoch 3:
    every epoch equals the uninterrupted run's (weights, Adam's moments and step count carried)."""
    from vae.pack import PackTrainer

    c = _configs()[1]
    whole = fit(c, sample_data)
    saved = {}

    def stop_after_1(m, state):
        saved.update(model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
                     best_score=state.best_score, best_epoch=state.best_epoch)
        return False

    fit(c, sample_data, on_epoch=stop_after_1)
    model = BetaVAE.from_config(c)
    model.load_state_dict(saved["model"])
    trainer = PackTrainer(sample_data)
    trainer.add("m", c, model=model, optimizer_state=saved["optimizer"], epoch=1,
                best_score=saved["best_score"], best_epoch=saved["best_epoch"])
    trainer.add("other", _configs()[0])  # a neighbour at its own epoch 1
    second = trainer.round(["m", "other"])["m"]
    assert second["epoch"] == 2 and second["val_elbo"] == pytest.approx(whole.history[1]["val_elbo"], rel=REL)
    snap = trainer.snapshot("m")
    steps = -(-len(sample_data.train) // c.batch_size)  # per epoch
    assert snap["epoch"] == 2 and snap["optimizer"]["state"][0]["step"].item() == 2 * steps
    resumed_model = BetaVAE.from_config(c)
    resumed_model.load_state_dict(snap["model"])
    third = fit(c, sample_data, model=resumed_model, optimizer_state=snap["optimizer"], start_epoch=3,
                best_score=snap["best_score"], best_epoch=snap["best_epoch"])
    assert third.history[0]["val_elbo"] == pytest.approx(whole.history[2]["val_elbo"], rel=REL)
    assert third.best_epoch == whole.best_epoch


def test_the_flat_adam_moves_every_weight_as_the_per_tensor_one():
    """StackedAdam over one flat (K, P) buffer (a GPU's default) and per parameter tensor (a
    CPU's): the same weights and moments, bitwise, after steps with a learning rate per member."""
    from vae.pack import StackedAdam

    torch.manual_seed(0)
    a, b = PackedMLP([3, 7, 5], hidden=16), PackedMLP([3, 7, 5], hidden=16)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.normal_()
            q.copy_(p)
    flat, per = StackedAdam(list(a.parameters()), flat=True), StackedAdam(list(b.parameters()), flat=False)
    lr = torch.tensor([1e-3, 5e-3, 2e-2])
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model in (a, b):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        flat.step(lr)
        per.step(lr)
    for p, q, m1, m2, v1, v2 in zip(a.parameters(), b.parameters(), flat.exp_avg, per.exp_avg, flat.exp_avg_sq,
                                    per.exp_avg_sq):
        assert torch.equal(p, q) and torch.equal(m1, m2) and torch.equal(v1, v2)
    assert flat.steps == per.steps == [3, 3, 3]
    assert not torch.equal(p, torch.zeros_like(p))


def test_a_member_whose_loss_goes_non_finite_fails_alone_and_says_why(sample_data):
    """A member that diverges leaves the pack as failed, its reason kept for its trial to report
    (the pack's process names it in the trial's error); its neighbour trains on unchanged."""
    from vae.pack import PackTrainer

    good, bad = _configs()[0], _configs()[1].replace(beta=1000.0, lr=9.0)
    trainer = PackTrainer(sample_data)
    trainer.add("good", good)
    trainer.add("bad", bad)
    out = trainer.round(["good", "bad"])
    assert out["bad"] is None and "bad" not in trainer.members
    assert "non-finite" in trainer.errors["bad"] and "lr=9" in trainer.errors["bad"]
    alone = fit(good, sample_data)
    assert out["good"]["val_elbo"] == pytest.approx(alone.history[0]["val_elbo"], rel=REL)
    trainer.add("bad", good)  # the same key joining again starts with no error
    assert "bad" not in trainer.errors


def test_the_conv_net_packs_through_torch_func_and_each_member_equals_its_run_alone(sample_data):
    """The reference's conv net stacked with torch.func (functional_call under vmap), members of
    different d masked to the largest: each member's epochs equal fit alone, and its weights
    come back as a single model."""
    from vae.pack import PackedFunc

    base = dict(dataset="mnist-sample", max_train_images=120, epochs=2, batch_size=32, arch="conv")
    configs = [TrainConfig(latent_dim=3, beta=1.0, lr=1e-3, seed=0, augment="none", **base),
               TrainConfig(latent_dim=5, beta=0.5, lr=2e-3, seed=1, augment="shift", **base)]
    pack = Pack(configs, sample_data)
    for _ in range(2):
        pack.run_epoch()
    assert isinstance(pack.model, PackedFunc) and pack.model.mask.shape == (2, 1, 5)
    for c, member in zip(configs, pack.results):
        alone = fit(c, sample_data)
        for a, b in zip(alone.history, member.history):
            assert b["val_elbo"] == pytest.approx(a["val_elbo"], rel=REL), (c.latent_dim, a["epoch"])
        assert member.model.latent_dim == c.latent_dim and member.model.arch == "conv"


@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_batches_moved_together_equal_each_moved_alone(kind):
    """A pack moves its members' images in one call, each image by its own member's draws:
    exactly what ``augment_batch`` gives each member's batch alone."""
    from vae.train import augment_apply, augment_batch, augment_draws

    x = torch.rand(3, 16, 1, 28, 28)
    alone = [augment_batch(x[i], kind, torch.Generator().manual_seed(i)) for i in range(3)]
    draws = [augment_draws(16, kind, torch.Generator().manual_seed(i), "cpu") for i in range(3)]
    together = augment_apply(x.reshape(48, 1, 28, 28), kind, torch.cat([s for s, _ in draws]),
                             torch.cat([u for _, u in draws])).reshape(3, 16, 1, 28, 28)
    for i in range(3):
        assert torch.equal(together[i], alone[i]), i
    assert not torch.equal(alone[0], x[0])  # it moved something
