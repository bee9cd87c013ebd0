"""A pack: K MLP beta-VAEs of one shape trained as one stacked model.

A small beta-VAE leaves an accelerator idle: one trial's step is a few small matmuls, bound by
kernel launches and the Python loop. A pack holds the weights of K of them on a leading K axis
and runs each layer for all of them as one batched matmul (``torch.baddbmm``), with one
optimiser step for all (HFTA, Wang et al. 2021, "Horizontally Fused Training Array"; PyTorch's
model-ensembling recipe does the same with ``torch.func``).

Members share the architecture (the MLP's hidden width and layers) and the batch size; they
differ in latent size d, beta, learning rate (and its schedule), augmentation and seed:

- **d is masked to the pack's largest, D.** A member's latent dimensions past its own d are
  multiplied by 0 (``mask``): its mean there is 0, its log-variance 0, its noise 0, so its z is
  0 there, the KL term of those dimensions is 0 (``-0.5 (1 + 0 - 0 - e^0)``), the decoder's
  weights from them see a zero input and get zero gradient, and Adam moves no weight whose
  gradient has always been zero. The member is the d-dimensional model, exactly: its first d
  columns are the smaller model's weights, the rest stay at 0 (:meth:`PackedMLP.member`).
- **Each member draws as it would alone.** Its initialisation is a ``BetaVAE`` made under its own
  seed; each epoch its batch order, augmentation and noise come from its own generator, seeded
  by (seed, epoch) and drawn in the order ``vae.train.fit`` draws them. So a member trained in a
  pack equals the same configuration trained alone, up to the order of floating-point sums
  (``tests/test_pack.py``).
- **Each member has its own Adam**: the update is elementwise, so one update over the stacked
  weights with a learning rate per member (a (K, 1, 1) tensor) is K updates. It follows
  ``torch.optim.Adam``'s own arithmetic.
- **A member leaves** (:meth:`Pack.drop`, a pruned trial): its slices of every weight and of
  Adam's state are taken out, so it stops costing compute and the others go on unchanged.

No Ray here: ``vae/`` never imports it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vae.config import ConfigError, TrainConfig
from vae.data import Data
from vae.loss import kl_terms
from vae.model import N_PIXELS, BetaVAE
from vae.train import augment_batch, check_select, evaluate_loss, improves, lr_at, resolve_device, score

# Adam's defaults, as torch.optim.Adam's
BETAS, EPS = (0.9, 0.999), 1e-8
# The settings every member of one pack shares: the shape of the stacked model and its batches.
SHARED = ("arch", "hidden", "layers", "batch_size", "epochs", "dataset", "device", "precision")


def pack_key(config: TrainConfig) -> tuple:
    """Configurations with the same key can share a pack."""
    return tuple(getattr(config, k) for k in SHARED)


def check_packable(configs: list[TrainConfig]) -> None:
    """Raise ConfigError unless ``configs`` can train as one pack (MLP, one shape)."""
    if not configs:
        raise ConfigError("a pack needs at least one configuration")
    for c in configs:
        if c.arch != "mlp":
            raise ConfigError(f"arch={c.arch!r}: only the mlp architecture packs into stacked matmuls")
        if pack_key(c) != pack_key(configs[0]):
            differ = [k for k in SHARED if getattr(c, k) != getattr(configs[0], k)]
            raise ConfigError(f"configurations differ in {', '.join(differ)}: one pack shares {', '.join(SHARED)}")


class PackedMLP(torch.nn.Module):
    """K MLP beta-VAEs (``vae.model.MLPEncoder``/``MLPDecoder``), weights on a leading K axis.

    Each ``nn.Linear(i, o)`` of the single model is a weight (K, i, o) (the transpose of
    Linear's, so that ``x @ w`` is ``baddbmm``) and a bias (K, 1, o). Latent layers are D wide.
    """

    def __init__(self, latent_dims: list[int], hidden: int, layers: int = 1) -> None:
        super().__init__()
        k, d = len(latent_dims), max(latent_dims)
        self.latent_dims = list(latent_dims)
        self.hidden, self.layers = hidden, layers
        shapes = {"enc_fc": (N_PIXELS, hidden), **{f"enc_deeper{i}": (hidden, hidden) for i in range(layers - 1)},
                  "enc_mu": (hidden, d), "enc_logvar": (hidden, d), "dec_fc": (d, hidden),
                  **{f"dec_deeper{i}": (hidden, hidden) for i in range(layers - 1)}, "dec_out": (hidden, N_PIXELS)}
        self.names = list(shapes)
        for name, (i, o) in shapes.items():
            self.register_parameter(f"{name}_w", torch.nn.Parameter(torch.zeros(k, i, o)))
            self.register_parameter(f"{name}_b", torch.nn.Parameter(torch.zeros(k, 1, o)))
        self.register_buffer("mask", (torch.arange(d)[None, :] < torch.tensor(latent_dims)[:, None]).float()[:, None, :])

    @classmethod
    def from_models(cls, models: list[BetaVAE]) -> "PackedMLP":
        """A pack holding these single models' weights (their latent sizes may differ)."""
        first = models[0].encoder
        hidden, layers = first.fc.out_features, len(first.deeper) + 1
        pack = cls([m.latent_dim for m in models], hidden, layers)
        with torch.no_grad():
            for k, m in enumerate(models):
                for name, linear in _linears(m):
                    w, b = getattr(pack, f"{name}_w"), getattr(pack, f"{name}_b")
                    o, i = linear.weight.shape
                    w[k, :i, :o] = linear.weight.T
                    b[k, 0, :o] = linear.bias
        return pack

    def member(self, k: int) -> BetaVAE:
        """Member ``k`` as a single ``BetaVAE`` of its own latent size (a copy, on the CPU)."""
        d = self.latent_dims[k]
        model = BetaVAE("mlp", d, self.hidden, self.layers)
        with torch.no_grad():
            for name, linear in _linears(model):
                o, i = linear.weight.shape
                linear.weight.copy_(getattr(self, f"{name}_w")[k, :i, :o].T)
                linear.bias.copy_(getattr(self, f"{name}_b")[k, 0, :o])
        return model

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(getattr(self, f"{name}_b"), x, getattr(self, f"{name}_w"))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B, 784) pixels -> (mu, logvar), each (K, B, D), 0 past each member's d."""
        h = torch.relu(self._linear("enc_fc", x))
        for i in range(self.layers - 1):
            h = torch.relu(self._linear(f"enc_deeper{i}", h))
        return self._linear("enc_mu", h) * self.mask, self._linear("enc_logvar", h) * self.mask

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + eps * sigma, (K, B, D), 0 past each member's d whatever ``eps`` holds there."""
        return (mu + eps * torch.exp(0.5 * logvar)) * self.mask

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(K, B, D) -> logits (K, B, 784)."""
        h = torch.relu(self._linear("dec_fc", z))
        for i in range(self.layers - 1):
            h = torch.relu(self._linear(f"dec_deeper{i}", h))
        return self._linear("dec_out", h)

    def take(self, keep: list[int]) -> None:
        """Keep only the members at positions ``keep`` (in that order)."""
        index = torch.tensor(keep, device=self.mask.device)
        for p in self.parameters():
            p.data = p.data.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.latent_dims = [self.latent_dims[k] for k in keep]


def _linears(model: BetaVAE) -> list[tuple[str, torch.nn.Linear]]:
    enc, dec = model.encoder, model.decoder
    return [("enc_fc", enc.fc), *((f"enc_deeper{i}", l) for i, l in enumerate(enc.deeper)),
            ("enc_mu", enc.mu), ("enc_logvar", enc.logvar), ("dec_fc", dec.fc),
            *((f"dec_deeper{i}", l) for i, l in enumerate(dec.deeper)), ("dec_out", dec.out)]


class StackedAdam:
    """Adam on stacked weights with a learning rate per member: ``torch.optim.Adam``'s update
    (its single-tensor arithmetic, default betas and eps), elementwise, so member k's slices
    move exactly as its own Adam would move them."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """``lr``: (K,) learning rates, one per member."""
        self.steps += 1
        beta1, beta2 = BETAS
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        step_size = (lr / bias_correction1).neg()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(EPS)
            p.addcdiv_(m * step_size.view(-1, *([1] * (p.dim() - 1))), denom)

    def take(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.params[0].device)
        self.exp_avg = [m.index_select(0, index) for m in self.exp_avg]
        self.exp_avg_sq = [v.index_select(0, index) for v in self.exp_avg_sq]


@dataclass
class MemberResult:
    """One member's run: its configuration, its per-epoch metrics (as ``fit``'s history), why it
    ended (``completed``, ``dropped``, ``failed``), and its best epoch's weights."""

    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"
    error: str | None = None
    best_epoch: int | None = None
    model: BetaVAE | None = None


OnMemberEpoch = Callable[[int, dict[str, Any], BetaVAE], Any]


class Pack:
    """K configurations trained as one stacked model, epoch by epoch, in lockstep.

    Args:
        configs: the members' configurations (``check_packable``).
        data: the loaded splits, shared by every member (one dataset, one split).
        select, mode: the validation metric that chooses each member's best epoch, as ``fit``'s.
    """

    def __init__(self, configs: list[TrainConfig], data: Data, select: str = "val_elbo", mode: str = "min") -> None:
        check_packable(configs)
        check_select(select, mode)
        self.select, self.mode = select, mode
        self.configs = list(configs)
        self.device = resolve_device(configs[0].device)
        models = []
        for c in configs:
            torch.manual_seed(c.seed)  # as fit does before it builds the model
            models.append(BetaVAE.from_config(c))
        self.model = PackedMLP.from_models(models).to(self.device)
        self.opt = StackedAdam(list(self.model.parameters()))
        self.gens = [torch.Generator(device=self.device) for _ in configs]
        self.x_train = data.train.pixels(self.device).reshape(-1, N_PIXELS)  # (N, 784)
        self.x_val = data.val.pixels(self.device)
        self.results = [MemberResult(c) for c in configs]
        self.live = list(range(len(configs)))  # positions in self.results of the pack's members, in order
        self.best = [math.inf] * len(configs)
        self.epoch = 0
        self.train_seconds = 0.0

    def drop(self, members: list[int]) -> None:
        """Take these members (indices into ``configs``) out: a pruned trial stops costing compute."""
        gone = set(members)
        keep = [i for i, k in enumerate(self.live) if k not in gone]
        for k in gone & set(self.live):
            self.results[k].status = "dropped"
        self.live = [self.live[i] for i in keep]
        if keep:
            self.model.take(keep)
            self.opt.take(keep)
            self.gens = [self.gens[i] for i in keep]

    def run_epoch(self) -> dict[int, dict[str, Any]]:
        """Train every member for one epoch, then validate each; returns their metrics by member."""
        self.epoch += 1
        epoch, cfgs = self.epoch, [self.configs[k] for k in self.live]
        n = self.x_train.shape[0]
        bs = min(cfgs[0].batch_size, n)
        n_steps = (n + bs - 1) // bs
        total_steps = n_steps * cfgs[0].epochs
        betas = torch.tensor([c.beta for c in cfgs], device=self.device)
        t0 = time.perf_counter()
        perms = []
        for c, g in zip(cfgs, self.gens):  # each member's batches and noise depend only on (seed, epoch)
            g.manual_seed(c.seed + 1_000_003 * epoch)
            perms.append(torch.randperm(n, generator=g, device=self.device))
        order = torch.stack(perms)  # (K, N)
        sums = torch.zeros(len(cfgs), 3, device=self.device)
        d_max = self.model.mask.shape[-1]  # the pack's D (kept when its widest member leaves)
        for step in range(n_steps):
            idx = order[:, step * bs:(step + 1) * bs]  # (K, B)
            xb = self.x_train[idx]  # (K, B, 784)
            b = xb.shape[1]
            eps = torch.zeros(len(cfgs), b, d_max, device=self.device)
            moved = []
            for i, (c, g) in enumerate(zip(cfgs, self.gens)):  # drawn as fit draws them: augment, then noise
                moved.append(augment_batch(xb[i].reshape(b, 1, 28, 28), c.augment, g).reshape(b, N_PIXELS))
                d = self.model.latent_dims[i]
                eps[i, :, :d] = torch.randn((b, d), generator=g, device=self.device)
            xb = torch.stack(moved)
            mu, logvar = self.model.encode(xb)
            logits = self.model.decode(self.model.reparameterize(mu, logvar, eps))
            recon = F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(dim=(1, 2)) / b  # (K,)
            kl = kl_terms(mu, logvar).sum(dim=(1, 2)) / b  # (K,)
            total = recon + betas * kl
            for p in self.model.parameters():
                p.grad = None
            total.sum().backward()  # members' weights are disjoint: each gets its own gradient
            lrs = torch.tensor([lr_at(c.lr_schedule, c.lr, (epoch - 1) * n_steps + step, total_steps) for c in cfgs],
                               device=self.device)
            self.opt.step(lrs)
            sums += torch.stack([total.detach(), recon.detach(), kl.detach()], dim=1) * b
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        out: dict[int, dict[str, Any]] = {}
        train = (sums / n).tolist()
        failed = []
        for i, k in enumerate(self.live):
            res, c = self.results[k], self.configs[k]
            if not all(math.isfinite(v) for v in train[i]):
                res.status, res.error = "failed", f"non-finite loss at epoch {epoch} (lr={c.lr:g}, beta={c.beta:g}); try a lower lr"
                failed.append(k)
                continue
            member = self.model.member(i)
            v0 = time.perf_counter()
            val = evaluate_loss(member.to(self.device), self.x_val, c.beta)
            metrics = {"epoch": epoch, "train_loss": train[i][0], "train_recon": train[i][1], "train_kl": train[i][2],
                       **{f"val_{key}": v for key, v in val.items()}, "seconds": seconds,
                       "val_seconds": time.perf_counter() - v0,
                       "images_per_second": n / seconds if seconds > 0 else float("nan")}
            res.history.append(metrics)
            this = score(metrics, self.select, self.mode)
            if improves(this, self.best[k]):
                self.best[k], res.best_epoch, res.model = this, epoch, member.cpu()
            out[k] = metrics
        if failed:
            self.drop(failed)
            for k in failed:
                self.results[k].status = "failed"
        return out


def fit_pack(configs: list[TrainConfig], data: Data, on_epoch: OnMemberEpoch | None = None) -> list[MemberResult]:
    """Train ``configs`` as one pack to their last epoch; ``on_epoch(k, metrics, model)`` after each
    member's epoch (``model``: its current weights as a single BetaVAE); returning ``False``
    drops that member (an early stop). Returns one result per configuration, in order."""
    pack = Pack(configs, data)
    for _ in range(configs[0].epochs):
        if not pack.live:
            break
        metrics = pack.run_epoch()
        leaving = []
        for k, m in metrics.items():
            if on_epoch is not None and on_epoch(k, m, pack.model.member(pack.live.index(k))) is False:
                leaving.append(k)
        if leaving:
            pack.drop(leaving)
    return pack.results
