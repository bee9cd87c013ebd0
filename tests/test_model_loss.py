from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae.evaluate import mse_per_image, per_digit, psnr, summarise
from vae.loss import beta_vae_loss, elbo
from vae.model import BetaVAE, count_parameters


@pytest.mark.parametrize("d, n", [(5, 588_459), (10, 651_509), (15, 714_559), (20, 777_609)])
def test_conv_parameter_counts_match_reference(d, n):
    assert count_parameters(BetaVAE("conv", d)) == n


def test_mlp_shape_is_pytorch_examples():
    m = BetaVAE("mlp", 20, 400)
    # 784-400-(20,20) encoder and 20-400-784 decoder
    assert count_parameters(m) == (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes_and_logits(arch):
    m = BetaVAE(arch, 6)
    x = torch.rand(3, 1, 28, 28)
    logits, mu, logvar = m(x)
    assert logits.shape == (3, 1, 28, 28) and mu.shape == (3, 6) and logvar.shape == (3, 6)
    assert m.decode(mu).shape == (3, 1, 28, 28)
    # logits are unbounded (no sigmoid inside the decoder)
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.add_(5.0)
    assert (m.decode(mu).abs() > 1).any()


def test_loss_parts_against_hand_computed_values():
    # Two 2-pixel "images", d = 1.
    x = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    mu = torch.tensor([[1.0], [0.0]])
    logvar = torch.tensor([[0.0], [math.log(4.0)]])

    def bce(t, l):
        p = 1 / (1 + math.exp(-l))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    recon_1 = bce(1, 0) + bce(0, 0)
    recon_2 = bce(0.5, 2) + bce(1, -1)
    kl_1 = -0.5 * (1 + 0 - 1 - 1)  # mu=1, var=1 -> 0.5
    kl_2 = -0.5 * (1 + math.log(4) - 0 - 4)
    beta = 0.3
    total, recon, kl = beta_vae_loss(logits, x, mu, logvar, beta)
    assert recon.item() == pytest.approx((recon_1 + recon_2) / 2, rel=1e-6)
    assert kl.item() == pytest.approx((kl_1 + kl_2) / 2, rel=1e-6)
    assert total.item() == pytest.approx((recon_1 + recon_2) / 2 + beta * (kl_1 + kl_2) / 2, rel=1e-6)
    assert elbo(logits, x, mu, logvar).item() == pytest.approx((recon_1 + recon_2 + kl_1 + kl_2) / 2, rel=1e-6)


def test_psnr_formula():
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(1.0) == pytest.approx(0.0)
    assert psnr(0.02389) == pytest.approx(10 * math.log10(1 / 0.02389))
    np.testing.assert_allclose(psnr(np.array([0.1, 0.001])), [10.0, 30.0])


def test_mse_per_image_is_mean_over_pixels():
    x = torch.zeros(2, 1, 28, 28)
    r = torch.zeros(2, 1, 28, 28)
    r[0, 0, 0, 0] = 1.0  # one pixel wrong by 1
    r[1] += 0.5
    np.testing.assert_allclose(mse_per_image(r, x).numpy(), [1 / 784, 0.25], rtol=1e-6)


def test_per_digit_means_over_all_images_and_unweighted_summary():
    mse = np.array([0.1, 0.3, 0.2, 0.4, 0.4])
    labels = np.array([0, 0, 1, 1, 1])
    rows = per_digit(mse, labels)
    assert [r["digit"] for r in rows] == [0, 1]
    assert rows[0]["n_images"] == 2 and rows[0]["mse"] == pytest.approx(0.2)
    assert rows[1]["n_images"] == 3 and rows[1]["mse"] == pytest.approx(1.0 / 3)
    s = summarise(rows)
    assert s["mean_mse"] == pytest.approx((0.2 + 1 / 3) / 2)  # unweighted over digits
    assert s["mean_psnr"] == pytest.approx((psnr(0.2) + psnr(1 / 3)) / 2)
