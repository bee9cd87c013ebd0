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
  by (seed, epoch) and drawn in the order ``vae.train.fit`` draws them. Only the draws are made
  member by member; every member's images are then moved in one call (``augment_apply``: per
  image, so exactly as alone), and the host's per-step numbers (learning rates, Adam's bias
  corrections) are copied to the device once a round. So a member trained in a pack equals the
  same configuration trained alone, up to the order of floating-point sums (``tests/test_pack.py``).
- **Members are validated together** (:func:`evaluate_stacked`): one stacked pass over the
  validation split, each member with the validation noise it would draw alone.
- **Each member has its own Adam**: the update is elementwise, so one update over the stacked
  weights with a learning rate per member (a (K, 1) tensor) is K updates. It follows
  ``torch.optim.Adam``'s own arithmetic; on a GPU over one flat (K, P) buffer of every weight
  (:class:`StackedAdam`), so a step is a few launches whatever the number of layers.
- **Members join and leave at their own epochs** (:class:`PackTrainer`, continuous batching as
  inference servers do it): each round trains the members that ask for their next epoch, each at
  its own epoch (its own seed stream, learning-rate schedule and Adam step count), stacked for as
  long as the set does not change. A member that leaves (a pruned trial) stops costing compute,
  and the others go on unchanged. A member can join from a checkpoint of ``fit``'s (its weights
  and ``torch.optim.Adam`` state) and hands back the same (:meth:`PackTrainer.snapshot`), so a
  trial moves between a pack and ``fit`` at any epoch.

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
from vae.train import (EVAL_BATCH, VAL_SEED, augment_apply, augment_draws, check_select, evaluate_loss, improves, lr_at,
                       resolve_device, score)

# Adam's defaults, as torch.optim.Adam's
BETAS, EPS = (0.9, 0.999), 1e-8
# The settings every member of one pack shares: the shape of the stacked model and its batches.
SHARED = ("arch", "hidden", "layers", "batch_size", "epochs", "dataset", "data_dir", "val_fraction", "split_seed",
          "max_train_images", "device", "precision")


def pack_key(config: TrainConfig) -> tuple:
    """Configurations with the same key can share a pack."""
    return tuple(getattr(config, k) for k in SHARED)


def packable(config: TrainConfig) -> bool:
    """Whether a configuration can train in a pack: every architecture can (``stacked_model``)."""
    return config.arch in ("mlp", "conv")


def check_packable(configs: list[TrainConfig]) -> None:
    """Raise ConfigError unless ``configs`` can train as one pack (MLP, one shape)."""
    if not configs:
        raise ConfigError("a pack needs at least one configuration")
    for c in configs:
        if not packable(c):
            raise ConfigError(f"arch={c.arch!r} does not pack")
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

    def member(self, k: int, device: torch.device | str = "cpu") -> BetaVAE:
        """Member ``k`` as a single ``BetaVAE`` of its own latent size (a copy, on ``device``)."""
        d = self.latent_dims[k]
        model = BetaVAE("mlp", d, self.hidden, self.layers).to(device)
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


def _linears(model: BetaVAE) -> list[tuple[str, torch.nn.Linear]]:
    enc, dec = model.encoder, model.decoder
    return [("enc_fc", enc.fc), *((f"enc_deeper{i}", l) for i, l in enumerate(enc.deeper)),
            ("enc_mu", enc.mu), ("enc_logvar", enc.logvar), ("dec_fc", dec.fc),
            *((f"dec_deeper{i}", l) for i, l in enumerate(dec.deeper)), ("dec_out", dec.out)]


Layout = list[tuple[str, torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]


def _layout(model: BetaVAE) -> Layout:
    """How a single model's parameters sit in a pack: (key, parameter, to the pack's layout (a
    leading axis of 1), back). The MLP's linears are transposed for ``baddbmm``
    (:class:`PackedMLP`); any other network's parameters keep their shapes (:class:`PackedFunc`)."""
    if model.arch == "mlp":
        out: Layout = []
        for name, linear in _linears(model):
            out.append((f"{name}_w", linear.weight, lambda t: t.detach().T.unsqueeze(0), lambda t: t[0].T))
            out.append((f"{name}_b", linear.bias, lambda t: t.detach().view(1, 1, -1), lambda t: t[0, 0]))
        return out
    return [(_func_key(name), p, lambda t: t.detach().unsqueeze(0), lambda t: t[0])
            for name, p in model.named_parameters()]


def _func_key(name: str) -> str:
    return name.replace(".", "__")


def _slot(k: int, shape: torch.Size) -> tuple[slice, ...]:
    """Member k's slice of a stacked tensor, for a member tensor of ``shape`` (1, ...): its own
    sizes in every axis (the latent axis may be narrower than the pack's D)."""
    return (slice(k, k + 1), *(slice(0, n) for n in shape[1:]))


class PackedFunc(torch.nn.Module):
    """K beta-VAEs of any architecture (the conv net), parameters stacked on a leading K axis,
    run through ``torch.func``: ``functional_call`` of one D-wide ``BetaVAE`` under ``vmap``
    (PyTorch's model-ensembling recipe). Parameters keep the single model's shapes (its
    ``named_parameters``, '.' written '__'); latent widths are masked to each member's d as in
    :class:`PackedMLP`."""

    def __init__(self, arch: str, latent_dims: list[int], hidden: int = 400, layers: int = 1) -> None:
        super().__init__()
        k, d = len(latent_dims), max(latent_dims)
        self.arch, self.hidden, self.layers = arch, hidden, layers
        self.latent_dims = list(latent_dims)
        base = BetaVAE(arch, d, hidden, layers)
        self._shapes = {name: p.shape for name, p in base.named_parameters()}
        self.base = [base.to("meta")]  # in a list: not a submodule, its (meta) parameters not ours
        for name, shape in self._shapes.items():
            self.register_parameter(_func_key(name), torch.nn.Parameter(torch.zeros(k, *shape)))
        self.register_buffer("mask", (torch.arange(d)[None, :] < torch.tensor(latent_dims)[:, None]).float()[:, None, :])

    def _part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix):]: getattr(self, _func_key(name)) for name in self._shapes if name.startswith(prefix)}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B, 784) pixels -> (mu, logvar), each (K, B, D), 0 past each member's d."""
        from torch.func import functional_call, vmap

        enc = self.base[0].encoder

        def one(params: dict[str, torch.Tensor], xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return functional_call(enc, params, (xk.reshape(-1, 1, 28, 28),))

        mu, logvar = vmap(one)(self._part("encoder."), x)
        return mu * self.mask, logvar * self.mask

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (mu + eps * torch.exp(0.5 * logvar)) * self.mask

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(K, B, D) -> logits (K, B, 784)."""
        from torch.func import functional_call, vmap

        dec = self.base[0].decoder

        def one(params: dict[str, torch.Tensor], zk: torch.Tensor) -> torch.Tensor:
            return functional_call(dec, params, (zk,)).reshape(zk.shape[0], N_PIXELS)

        return vmap(one)(self._part("decoder."), z)

    def member(self, k: int, device: torch.device | str = "cpu") -> BetaVAE:
        """Member ``k`` as a single ``BetaVAE`` of its own latent size (a copy, on ``device``)."""
        model = BetaVAE(self.arch, self.latent_dims[k], self.hidden, self.layers).to(device)
        with torch.no_grad():
            for key, p, _, back in _layout(model):
                p.copy_(back(getattr(self, key)[_slot(k, (1, *p.shape))]))
        return model


def stacked_model(arch: str, latent_dims: list[int], hidden: int, layers: int) -> torch.nn.Module:
    """The stacked model for these members: batched matmuls for the MLP (measured 2.3x faster
    than ``torch.func`` on an H200 at K = 128), ``torch.func`` for every other network."""
    if arch == "mlp":
        return PackedMLP(latent_dims, hidden, layers)
    return PackedFunc(arch, latent_dims, hidden, layers)


class StackedAdam:
    """Adam on stacked weights with a learning rate and a step count per member:
    ``torch.optim.Adam``'s update (its single-tensor arithmetic, default betas and eps),
    elementwise, so member k's slices move exactly as its own Adam would move them.

    ``flat`` (the default on a GPU): the weights and both moments live in three (K, P) buffers,
    P a member's parameters end to end, each parameter a view of its columns (``.data``
    repointed), so a step is 9 operations over the whole pack (the gradients gathered by one
    ``torch.cat``) rather than 8 per parameter tensor: on a GPU each is a kernel launch. On a CPU,
    where launches cost little and the gather is one more pass over every weight, the update
    runs per parameter tensor. Both give the same numbers (``tests/test_pack.py``)."""

    def __init__(self, params: list[torch.nn.Parameter], exp_avg: list[torch.Tensor] | None = None,
                 exp_avg_sq: list[torch.Tensor] | None = None, steps: list[int] | None = None,
                 flat: bool | None = None) -> None:
        k = params[0].shape[0]
        self.params = params
        self.steps = list(steps) if steps is not None else [0] * k
        self.exp_avg = exp_avg if exp_avg is not None else [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = exp_avg_sq if exp_avg_sq is not None else [torch.zeros_like(p) for p in params]
        self.flat = params[0].device.type != "cpu" if flat is None else flat
        if not self.flat:
            return
        self._weights = torch.cat([p.detach().reshape(k, -1) for p in params], dim=1)  # (K, P)
        self._m = torch.cat([m.reshape(k, -1) for m in self.exp_avg], dim=1)
        self._v = torch.cat([v.reshape(k, -1) for v in self.exp_avg_sq], dim=1)
        self.exp_avg, self.exp_avg_sq = [], []
        at = 0
        for p in params:
            n, shape = p[0].numel(), p.shape
            p.data = self._weights[:, at:at + n].view(shape)
            self.exp_avg.append(self._m[:, at:at + n].view(shape))
            self.exp_avg_sq.append(self._v[:, at:at + n].view(shape))
            at += n

    def corrections(self, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's bias corrections for each member's next ``n`` steps, (n, K) each: (1 - beta1^t,
        sqrt(1 - beta2^t)), computed on the host as ``torch.optim.Adam`` computes them and copied to
        the device once (a copy a step would make the host wait for the device every step)."""
        beta1, beta2 = BETAS
        dev = self.params[0].device
        bc1 = [[1 - beta1 ** (s + j) for s in self.steps] for j in range(1, n + 1)]
        bc2 = [[math.sqrt(1 - beta2 ** (s + j)) for s in self.steps] for j in range(1, n + 1)]
        return torch.tensor(bc1, device=dev, dtype=dtype), torch.tensor(bc2, device=dev, dtype=dtype)

    @torch.no_grad()
    def step(self, lr: torch.Tensor, bias_correction1: torch.Tensor | None = None,
             bias_correction2_sqrt: torch.Tensor | None = None) -> None:
        """``lr``: (K,) learning rates, one per member; the bias corrections for this step (K,)
        each, a row of :meth:`corrections` (None: computed here)."""
        if bias_correction1 is None or bias_correction2_sqrt is None:
            bc1, bc2 = self.corrections(1, lr.dtype)
            bias_correction1, bias_correction2_sqrt = bc1[0], bc2[0]
        self.steps = [s + 1 for s in self.steps]
        beta1, beta2 = BETAS
        step_size = (lr / bias_correction1).neg()
        if self.flat:
            k = len(self.steps)
            g = torch.cat([p.grad.reshape(k, -1) for p in self.params], dim=1)
            parts = [(self._weights, g, self._m, self._v)]
        else:
            parts = [(p.data, p.grad, m, v) for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq)]
        for p, g, m, v in parts:
            shape = (-1, *([1] * (p.dim() - 1)))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt.view(shape)).add_(EPS)
            p.addcdiv_(m * step_size.view(shape), denom)


@dataclass
class Member:
    """One member of a pack: its configuration, its own weights and Adam state (in the pack's
    layout, one slice at its own d), where it stands (epochs trained, Adam steps), its best
    epoch by the pack's rule and that epoch's weights, and its history as ``fit``'s.

    ``status``: ``training``, ``completed`` (its last epoch trained), ``dropped`` (left before it),
    ``failed`` (a non-finite loss; ``error`` says why)."""

    config: TrainConfig
    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    steps: int = 0
    epoch: int = 0
    best_score: float = math.inf
    best_epoch: int | None = None
    best_params: dict[str, torch.Tensor] | None = None  # the best epoch's weights, pack layout (None: none this run)
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "training"
    error: str | None = None
    gen: torch.Generator | None = None

    @property
    def model(self) -> BetaVAE | None:
        """The best epoch's weights as a single ``BetaVAE`` on the CPU (None before any)."""
        return None if self.best_params is None else _single(self.config, self.best_params, "cpu")

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The best epoch's weights as a single model's ``state_dict`` on the CPU (None before any)."""
        model = self.model
        return None if model is None else model.state_dict()


def _single(config: TrainConfig, params: dict[str, torch.Tensor], device: torch.device | str) -> BetaVAE:
    """One member's weights in the pack's layout (``_layout``) as a single ``BetaVAE`` on ``device``."""
    model = BetaVAE.from_config(config).to(device)
    with torch.no_grad():
        for k, p, _, back in _layout(model):
            p.copy_(back(params[k]))
    return model


# Images x members validated at once: the stacked forward's activations are about this many
# images' worth per member-layer (the conv net's are 25,088 floats an image at its widest).
EVAL_MEMBER_IMAGES = {"mlp": 1 << 16}
EVAL_MEMBER_IMAGES_OTHER = 1 << 12


def evaluate_members(model: torch.nn.Module, x: torch.Tensor, betas: list[float]) -> list[dict[str, float]]:
    """A stacked model's members validated: in one stacked pass (:func:`evaluate_stacked`), except
    the conv net on a CPU, which validates member by member (``evaluate_loss`` of each as a single
    model: measured faster there than ``torch.func``'s stacked convolutions, BENCHMARKS §7)."""
    if isinstance(model, PackedFunc) and x.device.type == "cpu":
        return [evaluate_loss(model.member(i, x.device), x, beta) for i, beta in enumerate(betas)]
    return evaluate_stacked(model, x, betas)


@torch.no_grad()
def evaluate_stacked(model: torch.nn.Module, x: torch.Tensor, betas: list[float], seed: int = VAL_SEED
                     ) -> list[dict[str, float]]:
    """``vae.train.evaluate_loss`` for every member of a stacked model at once.

    Each member draws its validation noise as it would alone (a generator seeded ``seed``, one
    ``(B, d)`` draw per evaluation batch of ``EVAL_BATCH`` images, at its own d; members of
    one d share the draw), so each member's numbers equal its single model's up to the order of
    floating-point sums. Returns one dict per member: loss, elbo, recon, kl, mse."""
    was_training = model.training
    model.eval()
    dims = list(model.latent_dims)
    k, d_max = len(dims), model.mask.shape[-1]
    dev = x.device
    arch = getattr(model, "arch", "mlp")
    chunk = max(1, EVAL_MEMBER_IMAGES.get(arch, EVAL_MEMBER_IMAGES_OTHER) // k)
    gens = {d: torch.Generator(device=dev).manual_seed(seed) for d in sorted(set(dims))}
    sums = torch.zeros(k, 3, dtype=torch.float64, device=dev)  # recon, kl, mse
    flat = x.reshape(x.shape[0], N_PIXELS)
    for i in range(0, x.shape[0], EVAL_BATCH):
        xb = flat[i: i + EVAL_BATCH]
        b = xb.shape[0]
        drawn = {d: torch.randn((b, d), generator=g, device=dev) for d, g in gens.items()}
        eps = torch.zeros(k, b, d_max, device=dev)
        for j, d in enumerate(dims):
            eps[j, :, :d] = drawn[d]
        for a in range(0, b, chunk):
            xc = xb[a: a + chunk].unsqueeze(0).expand(k, -1, -1)  # (K, c, 784)
            mu, logvar = model.encode(xc)
            logits = model.decode(model.reparameterize(mu, logvar, eps[:, a: a + chunk]))
            recon = F.binary_cross_entropy_with_logits(logits, xc, reduction="none").sum(2)  # (K, c)
            kl = kl_terms(mu, logvar).sum(2)
            mse = (torch.sigmoid(model.decode(mu)) - xc).pow(2).mean(2)
            sums += torch.stack([recon.sum(1), kl.sum(1), mse.sum(1)], dim=1).double()
    model.train(was_training)
    n = x.shape[0]
    out = []
    for (recon, kl, mse), beta in zip((sums / n).tolist(), betas):
        out.append({"loss": recon + beta * kl, "elbo": recon + kl, "recon": recon, "kl": kl, "mse": mse})
    return out


def _member_tensors(model: BetaVAE, optimizer_state: dict[str, Any] | None, device: torch.device
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """A single model's weights and its ``torch.optim.Adam`` state (``fit``'s, or None: fresh)
    in the pack's layout (``_layout``)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    state = (optimizer_state or {}).get("state", {})
    params, m1, m2, steps = {}, {}, {}, 0
    for key, p, lay, _ in _layout(model):
        params[key] = lay(p).to(device, torch.float32).contiguous()
        s = state.get(order[id(p)]) or state.get(str(order[id(p)]))
        if s:
            m1[key] = lay(s["exp_avg"]).to(device, torch.float32).contiguous()
            m2[key] = lay(s["exp_avg_sq"]).to(device, torch.float32).contiguous()
            steps = int(float(s["step"]))
        else:
            m1[key], m2[key] = torch.zeros_like(params[key]), torch.zeros_like(params[key])
    return params, m1, m2, steps


OnMemberEpoch = Callable[[int, dict[str, Any], BetaVAE], Any]


class _Draws:
    """Where a round's members draw their randomness each step, so that a member's draws are one
    operation each and reach the stacked batch together: each member's noise is drawn into its
    own contiguous (B, d) block of one flat buffer (``normal_`` of a contiguous block gives the
    numbers ``torch.randn`` gives), then placed in the (K, B, D) noise by one
    indexed copy; each augmented member's shifts and uniforms into its rows of its group's
    buffers, which ``augment_apply`` takes whole."""

    def __init__(self, dims: list[int], d_max: int, groups: dict[str, list[int]], device: torch.device) -> None:
        self.dims, self.d_max, self.groups, self.device = dims, d_max, groups, device
        self._by_b: dict[int, tuple] = {}  # at most two batch sizes a round: the full and the last

    def buffers(self, b: int) -> tuple[list[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]],
                                       dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """For a batch of ``b``: each member's noise block, each augmented member's (shift, u)
        rows, and each augmentation group's whole (shift, u)."""
        if b not in self._by_b:
            flat = torch.empty(b * sum(self.dims), device=self.device)
            noise, at = [], 0
            for d in self.dims:
                noise.append(flat[at:at + b * d].view(b, d))
                at += b * d
            # each member's (B, d) block, row by row, member after member: the (K, B, D) positions
            # whose column is below the member's d, in order
            inside = torch.arange(self.d_max, device=self.device) < torch.tensor(self.dims, device=self.device)[:, None, None]
            where = inside.expand(len(self.dims), b, self.d_max).reshape(-1).nonzero().squeeze(1)
            moves, into = {}, {}
            for kind, pos in self.groups.items():
                shift = torch.empty(len(pos) * b, 2, dtype=torch.int64, device=self.device)
                u = torch.empty(len(pos) * b, 2, device=self.device)
                into[kind] = (shift, u)
                for j, i in enumerate(pos):
                    moves[i] = (shift[j * b:(j + 1) * b], u[j * b:(j + 1) * b])
            self._by_b[b] = (flat, noise, where, moves, into)
        _, noise, _, moves, into = self._by_b[b]
        return noise, moves, into

    def eps(self, b: int) -> torch.Tensor:
        """The noise just drawn as (K, B, D), 0 past each member's d."""
        flat, _, where, _, _ = self._by_b[b]
        eps = torch.zeros(len(self.dims) * b * self.d_max, device=self.device)
        eps[where] = flat
        return eps.view(len(self.dims), b, self.d_max)


class PackTrainer:
    """Members that train together, joining and leaving at their own epochs.

    Each :meth:`round` trains one epoch of each member asked for, each at its own next epoch,
    as one stacked model; the stack is kept between rounds while the set of members is the
    same, and rebuilt when it changes. A round's D is the largest d among its members.

    Args:
        data: the loaded splits, shared by every member (one dataset, one split).
        device: where the stacked model trains.
        select, mode: the validation metric that chooses each member's best epoch, as ``fit``'s.
        flat_adam: Adam over one flat buffer (:class:`StackedAdam`); None: on a GPU only.
    """

    def __init__(self, data: Data, device: torch.device | str = "cpu", select: str = "val_elbo",
                 mode: str = "min", flat_adam: bool | None = None) -> None:
        check_select(select, mode)
        self.select, self.mode = select, mode
        self.device = torch.device(device)
        self.x_train = data.train.pixels(self.device).reshape(-1, N_PIXELS)  # (N, 784)
        self.x_val = data.val.pixels(self.device)
        self.members: dict[Any, Member] = {}
        self._stack: tuple[Any, ...] = ()  # the members the stacked model holds, in order
        self._model: PackedMLP | None = None
        self._opt: StackedAdam | None = None
        self.flat_adam = flat_adam
        self.train_seconds = 0.0
        self.rounds = 0
        self.errors: dict[Any, str] = {}  # why each member that failed a round left (until it joins again)

    def add(self, key: Any, config: TrainConfig, *, model: BetaVAE | None = None,
            optimizer_state: dict[str, Any] | None = None, epoch: int = 0, best_score: float = math.inf,
            best_epoch: int | None = None) -> Member:
        """A member joins: fresh (initialised as ``fit`` initialises it, from its seed), or from a
        checkpoint taken after ``epoch`` (its weights, Adam state and best score, as ``fit``'s)."""
        if key in self.members:
            raise ValueError(f"member {key!r} is already in the pack")
        others = [m.config for m in self.members.values()]
        check_packable([config, *others[:1]])
        if model is None:
            torch.manual_seed(config.seed)  # as fit does before it builds the model
            model = BetaVAE.from_config(config)
        params, m1, m2, steps = _member_tensors(model, optimizer_state, self.device)
        member = Member(config, params, m1, m2, steps=steps, epoch=epoch, best_score=best_score,
                        best_epoch=best_epoch, gen=torch.Generator(device=self.device))
        self.members[key] = member
        self.errors.pop(key, None)
        return member

    def remove(self, key: Any, status: str = "dropped") -> Member | None:
        """A member leaves (pruned, finished or gone): it no longer costs compute or memory here."""
        if key in self._stack:
            self._unstack()
        member = self.members.pop(key, None)
        if member is not None and member.status == "training":
            member.status = status
        return member

    def _unstack(self) -> None:
        """Write the stacked model's slices back to their members and forget the stack."""
        if self._model is None:
            return
        model, opt = self._model, self._opt
        names = [n for n, _ in model.named_parameters()]
        for k, key in enumerate(self._stack):
            member = self.members.get(key)
            if member is None:
                continue
            for name, p, m1, m2 in zip(names, model.parameters(), opt.exp_avg, opt.exp_avg_sq):
                at = _slot(k, member.params[name].shape)
                member.params[name] = p.data[at].clone()
                member.exp_avg[name] = m1[at].clone()
                member.exp_avg_sq[name] = m2[at].clone()
            member.steps = opt.steps[k]
        self._stack, self._model, self._opt = (), None, None

    def _stacked(self, keys: tuple[Any, ...]) -> tuple[PackedMLP, StackedAdam]:
        if keys == self._stack and self._model is not None:
            return self._model, self._opt
        self._unstack()
        members = [self.members[k] for k in keys]
        c = members[0].config
        model = stacked_model(c.arch, [m.config.latent_dim for m in members], c.hidden, c.layers).to(self.device)
        m1s, m2s = [], []
        with torch.no_grad():
            for name, p in model.named_parameters():
                m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
                for k, m in enumerate(members):
                    at = _slot(k, m.params[name].shape)
                    p[at] = m.params[name]
                    m1[at] = m.exp_avg[name]
                    m2[at] = m.exp_avg_sq[name]
                m1s.append(m1)
                m2s.append(m2)
        opt = StackedAdam(list(model.parameters()), m1s, m2s, [m.steps for m in members], flat=self.flat_adam)
        self._stack, self._model, self._opt = keys, model, opt
        return model, opt

    def model_of(self, key: Any, device: torch.device | str | None = None) -> BetaVAE:
        """Member ``key``'s current weights as a single ``BetaVAE`` (a copy)."""
        device = self.device if device is None else device
        if key in self._stack:
            return self._model.member(self._stack.index(key), device)
        member = self.members[key]
        return _single(member.config, member.params, device)

    def _current(self, key: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """Member ``key``'s weights, Adam moments and step count now (its stack slices where stacked)."""
        member = self.members[key]
        if key not in self._stack:
            return member.params, member.exp_avg, member.exp_avg_sq, member.steps
        k = self._stack.index(key)
        params, m1, m2 = {}, {}, {}
        for (name, p), a, b in zip(self._model.named_parameters(), self._opt.exp_avg, self._opt.exp_avg_sq):
            at = _slot(k, member.params[name].shape)
            params[name], m1[name], m2[name] = p.data[at], a[at], b[at]
        return params, m1, m2, self._opt.steps[k]

    def snapshot(self, key: Any) -> dict[str, Any]:
        """What a checkpoint of member ``key`` holds, as ``fit``'s (on the CPU): its current
        weights (``model``), a ``torch.optim.Adam`` state dict that ``fit`` resumes from
        (``optimizer``), its epoch, best score and epoch, and the best epoch's weights."""
        from vae.train import make_optimizer

        member = self.members[key]
        params, exp_avg, exp_avg_sq, steps = self._current(key)
        model = BetaVAE.from_config(member.config)
        opt = make_optimizer(model, member.config.lr)
        with torch.no_grad():
            for k, p, _, back in _layout(model):
                p.copy_(back(params[k]))
                opt.state[p] = {"step": torch.tensor(float(steps)),
                                "exp_avg": back(exp_avg[k].cpu()).contiguous().clone(),
                                "exp_avg_sq": back(exp_avg_sq[k].cpu()).contiguous().clone()}
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": member.epoch,
                "best_score": member.best_score, "best_epoch": member.best_epoch,
                "best_state": member.best_state}

    def round(self, keys: list[Any]) -> dict[Any, dict[str, Any] | None]:
        """Train one epoch of each of these members (each its own next epoch), then validate each.

        Returns each member's epoch metrics (as ``fit``'s, with ``is_best``), or None for a member
        whose loss went non-finite (it leaves with ``status='failed'``; the reason stays in
        ``errors[key]`` until it joins again)."""
        keys = tuple(k for k in keys if k in self.members)
        if not keys:
            return {}
        model, opt = self._stacked(keys)
        members = [self.members[k] for k in keys]
        for m in members:
            m.epoch += 1
        cfgs = [m.config for m in members]
        n = self.x_train.shape[0]
        bs = min(cfgs[0].batch_size, n)
        n_steps = (n + bs - 1) // bs
        total_steps = n_steps * cfgs[0].epochs
        betas = torch.tensor([c.beta for c in cfgs], device=self.device)
        t0 = time.perf_counter()
        for m in members:  # each member's batches and noise depend only on (seed, epoch)
            m.gen.manual_seed(m.config.seed + 1_000_003 * m.epoch)
        order = torch.stack([torch.randperm(n, generator=m.gen, device=self.device) for m in members])  # (K, N)
        sums = torch.zeros(len(members), 3, device=self.device)
        d_max = model.mask.shape[-1]
        # what each step needs from the host, copied once a round: learning rates, Adam's corrections
        lrs = torch.tensor([[lr_at(c.lr_schedule, c.lr, (m.epoch - 1) * n_steps + step, total_steps)
                             for c, m in zip(cfgs, members)] for step in range(n_steps)], device=self.device)
        bc1, bc2 = opt.corrections(n_steps)
        groups: dict[str, list[int]] = {}  # members by augmentation, moved together
        for i, c in enumerate(cfgs):
            if c.augment != "none":
                groups.setdefault(c.augment, []).append(i)
        where = {kind: torch.tensor(pos, device=self.device) for kind, pos in groups.items()}
        everyone = list(range(len(members)))
        dims = [c.latent_dim for c in cfgs]
        draws = _Draws(dims, d_max, groups, self.device)
        for step in range(n_steps):
            idx = order[:, step * bs:(step + 1) * bs]  # (K, B)
            xb = self.x_train[idx]  # (K, B, 784)
            b = xb.shape[1]
            noise, moves, into = draws.buffers(b)
            for i, m in enumerate(members):  # drawn as fit draws them: augment, then noise
                if i in moves:
                    augment_draws(b, m.config.augment, m.gen, self.device, out=moves[i])
                noise[i].normal_(generator=m.gen)  # torch.randn's numbers: it is normal_ of a new tensor
            eps = draws.eps(b)
            for kind, pos in groups.items():  # each image moved by its member's draws, all at once
                shift, u = into[kind]
                moved = augment_apply(xb[where[kind]].reshape(-1, 1, 28, 28), kind, shift, u).reshape(len(pos), b, N_PIXELS)
                xb = moved if pos == everyone else xb.index_copy(0, where[kind], moved)
            mu, logvar = model.encode(xb)
            logits = model.decode(model.reparameterize(mu, logvar, eps))
            recon = F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(dim=(1, 2)) / b  # (K,)
            kl = kl_terms(mu, logvar).sum(dim=(1, 2)) / b  # (K,)
            total = recon + betas * kl
            for p in model.parameters():
                p.grad = None
            total.sum().backward()  # members' weights are disjoint: each gets its own gradient
            opt.step(lrs[step], bc1[step], bc2[step])
            sums += torch.stack([total.detach(), recon.detach(), kl.detach()], dim=1) * b
        train = (sums / n).tolist()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        self.rounds += 1
        v0 = time.perf_counter()
        vals = evaluate_members(model, self.x_val, [c.beta for c in cfgs])
        val_seconds = time.perf_counter() - v0
        out: dict[Any, dict[str, Any] | None] = {}
        failed = []
        for i, (key, m, val) in enumerate(zip(keys, members, vals)):
            c = m.config
            if not all(math.isfinite(v) for v in train[i]):
                m.error = f"non-finite loss at epoch {m.epoch} (lr={c.lr:g}, beta={c.beta:g}); try a lower lr"
                failed.append(key)
                out[key] = None
                continue
            metrics = {"epoch": m.epoch, "train_loss": train[i][0], "train_recon": train[i][1], "train_kl": train[i][2],
                       **{f"val_{k}": v for k, v in val.items()}, "seconds": seconds,
                       "val_seconds": val_seconds,
                       "images_per_second": n / seconds if seconds > 0 else float("nan")}
            m.history.append(metrics)
            if not math.isfinite(metrics["val_elbo"]):
                m.error = f"non-finite validation -ELBO at epoch {m.epoch} (lr={c.lr:g}); try a lower lr"
                failed.append(key)
                out[key] = None
                continue
            this = score(metrics, self.select, self.mode)
            is_best = improves(this, m.best_score)
            if is_best:
                m.best_score, m.best_epoch = this, m.epoch
                m.best_params = {name: p.detach()[_slot(i, m.params[name].shape)].clone()
                                 for name, p in model.named_parameters()}
            if m.epoch >= c.epochs:
                m.status = "completed"
            out[key] = {**metrics, "is_best": is_best}
        for key in failed:
            self.members[key].status = "failed"
            self.errors[key] = self.members[key].error
            self.remove(key)
        return out


class Pack:
    """K configurations trained as one stacked model from epoch 1, in lockstep (a
    :class:`PackTrainer` whose members are 0..K-1 and stay until they end or are dropped).

    Args:
        configs: the members' configurations (``check_packable``).
        data: the loaded splits, shared by every member (one dataset, one split).
        select, mode: the validation metric that chooses each member's best epoch, as ``fit``'s.
    """

    def __init__(self, configs: list[TrainConfig], data: Data, select: str = "val_elbo", mode: str = "min") -> None:
        check_packable(configs)
        self.configs = list(configs)
        self.trainer = PackTrainer(data, resolve_device(configs[0].device), select, mode)
        self.results = [self.trainer.add(k, c) for k, c in enumerate(configs)]
        self.live = list(range(len(configs)))  # members still training, in order

    @property
    def model(self) -> PackedMLP | None:
        return self.trainer._model

    @property
    def train_seconds(self) -> float:
        return self.trainer.train_seconds

    def drop(self, members: list[int]) -> None:
        """Take these members out: a pruned trial stops costing compute."""
        for k in members:
            self.trainer.remove(k)
        self.live = [k for k in self.live if k not in set(members)]

    def run_epoch(self) -> dict[int, dict[str, Any]]:
        """Train every member for one epoch, then validate each; returns their metrics by member."""
        out = self.trainer.round(self.live)
        self.live = [k for k in self.live if k in self.trainer.members and out.get(k) is not None]
        return {k: m for k, m in out.items() if m is not None}


def fit_pack(configs: list[TrainConfig], data: Data, on_epoch: OnMemberEpoch | None = None) -> list[Member]:
    """Train ``configs`` as one pack to their last epoch; ``on_epoch(k, metrics, model)`` after each
    member's epoch (``model``: its current weights as a single BetaVAE); returning ``False``
    drops that member (an early stop). Returns one result per configuration, in order."""
    pack = Pack(configs, data)
    for _ in range(configs[0].epochs):
        if not pack.live:
            break
        metrics = pack.run_epoch()
        leaving = [k for k, m in metrics.items()
                   if on_epoch is not None and on_epoch(k, m, pack.trainer.model_of(k, "cpu")) is False]
        if leaving:
            pack.drop(leaving)
    for k in pack.live:
        pack.trainer.remove(k, status="completed")
    return pack.results
