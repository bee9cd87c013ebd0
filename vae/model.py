"""beta-VAE models: an MLP (pytorch/examples shape) and the reference project's conv net."""
from __future__ import annotations

import torch
from torch import nn

from vae.config import TrainConfig

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 784


def _deeper(hidden: int, layers: int) -> nn.ModuleList:
    """The hidden-to-hidden layers after the first (none at ``layers=1``, so pytorch/examples'
    network keeps its exact parameter names)."""
    return nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))


class MLPEncoder(nn.Module):
    def __init__(self, latent_dim: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(N_PIXELS, hidden)
        self.deeper = _deeper(hidden, layers)
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x.reshape(x.shape[0], N_PIXELS)))  # (B, hidden)
        for layer in self.deeper:
            h = torch.relu(layer(h))
        return self.mu(h), self.logvar(h)


class MLPDecoder(nn.Module):
    def __init__(self, latent_dim: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, hidden)
        self.deeper = _deeper(hidden, layers)
        self.out = nn.Linear(hidden, N_PIXELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z))
        for layer in self.deeper:
            h = torch.relu(layer(h))
        return self.out(h).reshape(z.shape[0], *IMAGE_SHAPE)


class ConvEncoder(nn.Module):
    """The reference project's (Keras) encoder, layer for layer (README, Definitions)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),  # (B, 32, 28, 28)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 14, 14)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(),  # (B, 12544)
            nn.Linear(64 * 14 * 14, 32), nn.ReLU(),
        )
        self.mu = nn.Linear(32, latent_dim)
        self.logvar = nn.Linear(32, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.reshape(x.shape[0], *IMAGE_SHAPE))
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    """The reference project's decoder; returns logits (the sigmoid lives in the loss)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 64 * 14 * 14)
        self.up = nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1)  # 14 -> 28
        self.out = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z)).reshape(z.shape[0], 64, 14, 14)
        return self.out(torch.relu(self.up(h)))  # (B, 1, 28, 28)


class BetaVAE(nn.Module):
    """A beta-VAE with a Gaussian posterior and a Bernoulli (logit) decoder."""

    def __init__(self, arch: str, latent_dim: int, hidden: int = 400, layers: int = 1) -> None:
        super().__init__()
        self.arch = arch
        self.latent_dim = latent_dim
        if arch == "mlp":
            self.encoder: nn.Module = MLPEncoder(latent_dim, hidden, layers)
            self.decoder: nn.Module = MLPDecoder(latent_dim, hidden, layers)
        elif arch == "conv":
            self.encoder = ConvEncoder(latent_dim)
            self.decoder = ConvDecoder(latent_dim)
        else:
            raise ValueError(f"unknown arch {arch!r}: choose mlp or conv")

    @classmethod
    def from_config(cls, config: TrainConfig) -> "BetaVAE":
        return cls(config.arch, config.latent_dim, config.hidden, config.layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) pixels -> (mu, logvar), each (B, d)."""
        return self.encoder(x)

    def reparameterize(
        self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> logits (B, 1, 28, 28)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        return self.decode(z), mu, logvar


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
