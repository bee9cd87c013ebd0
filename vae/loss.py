"""The beta-VAE loss, as a pure function that returns its parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def beta_vae_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bernoulli beta-VAE loss, averaged over the batch.

    loss = mean_i [ BCE_sum(x_i, logits_i) + beta * KL(q(z|x_i) || N(0, I)) ]
    with both terms summed over the image (784 pixels) and the latent (d dims)
    of each image, then averaged over the batch (Higgins et al. 2017). At beta = 1
    this is the negative ELBO in nats per image.

    Args:
        logits: decoder output, (B, 1, 28, 28) or (B, 784).
        x: target pixels in [0, 1], same shape as ``logits``.
        mu, logvar: posterior parameters, (B, d).
        beta: weight of the KL term.

    Returns:
        (total, recon, kl), each a scalar tensor: the batch means per image.
    """
    b = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / b
    kl = kl_terms(mu, logvar).sum() / b
    return recon + beta * kl, recon, kl


def kl_terms(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per image and latent dimension, (B, d), in nats.

    In closed form; Kingma & Welling 2014, Appendix B. Summed over d it is an image's KL term.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def bce_per_image(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli reconstruction term per image, (B,): BCE on logits summed over the pixels."""
    b = x.shape[0]
    return F.binary_cross_entropy_with_logits(logits.reshape(b, -1), x.reshape(b, -1), reduction="none").sum(1)


def per_image_terms(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (recon, kl), each of shape (B,): the parts of -ELBO before averaging."""
    return bce_per_image(logits, x), kl_terms(mu, logvar).sum(1)


def elbo(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """Negative ELBO in nats per image: the loss at beta = 1, independent of the trial's beta."""
    return beta_vae_loss(logits, x, mu, logvar, beta=1.0)[0]
