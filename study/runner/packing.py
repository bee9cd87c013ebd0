"""Trials packed into one stacked model per device: a pack actor trains, in lockstep epochs, the
members of every trial placed on its device (``vae.pack.PackTrainer``).

A study with ``--pack K`` keeps Ray Tune and ASHA as they are: every trial is still a Tune trial
with its own resources, reports, checkpoints and retries. Its training moves to a pack actor
on its node and device (a detached, named Ray actor, one per (study, node, device, shape),
holding at most K members): the trial joins it (fresh, or from its checkpoint), asks it for one
epoch at a time, reports that epoch as a trial trained alone would, and fetches its weights and
Adam state only where a checkpoint is due. The actor starts a round when every member that
trained in its last round has asked again (or a short gather window has passed), and trains
one epoch of each member that asked, each at its own epoch: trials join at their epoch 0 and
leave when they end or are stopped, as continuous batching does in inference servers. A
stopped trial stops asking, so it stops costing compute at once; its memory is freed when it
leaves or after ``IDLE_S`` without asking.

If the actor dies (its worker killed), every member's next call raises, each trial fails as a
trial whose worker died does, and Tune retries it from its last checkpoint (``max_failures``)
in a new pack. The driver removes a study's pack actors when its run ends.

No ``vae/`` module imports Ray; this one is the bridge.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from typing import Any

# A member that has not asked for an epoch for this long is taken out (its trial is gone).
IDLE_S = 600.0
# A round waits at most this long for the members of the previous round to ask again.
GATHER_MAX_S = 1.0
NAME_PREFIX = "vae-pack"
NAMESPACE = "vae-study-packs"  # detached actors need a namespace of their own to be found again


class PackServer:
    """The pack actor's body (``ray.remote`` wraps it in :func:`pack_actor`); a threaded actor:
    members' calls wait in their own threads while one thread trains the rounds.

    Args:
        name: the actor's name (recorded in each member's trials row).
        data_config: a member's TrainConfig values (dataset and split: every member shares them).
        device: where the stacked model trains (``cpu``, ``cuda``, ``auto``).
        select: (metric, mode) choosing each member's best epoch (``StudySpec.select``).
        capacity: the most members at once (``--pack K``).
        threads: torch's CPU threads for the rounds.
        gpus: the members' ``CUDA_VISIBLE_DEVICES`` (empty: the CPU).
    """

    def __init__(self, name: str, data_config: dict[str, Any], device: str, select: tuple[str, str],
                 capacity: int, threads: int, gpus: str = "") -> None:
        if gpus:  # the members' GPUs, before CUDA starts here: Ray gives an actor holding no GPU none
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        import torch

        from vae.config import TrainConfig
        from vae.data import load
        from vae.pack import PackTrainer
        from vae.train import resolve_device

        torch.set_num_threads(max(1, threads))
        self.name, self.capacity = name, capacity
        self.device = resolve_device(device)
        self.trainer = PackTrainer(load(TrainConfig.from_dict(data_config)), self.device, *select)
        self.cond = threading.Condition()
        self.train_lock = threading.RLock()  # the trainer is used by the round thread and by members' calls
        self.waiting: list[str] = []  # members asking for their next epoch, in order of asking
        self.results: dict[str, dict[str, Any]] = {}
        self.expected: set[str] = set()  # members of the last round, and those that joined since
        self.seen: dict[str, float] = {}
        self.last_round_s = 0.0
        self.stats = {"rounds": 0, "member_epochs": 0, "train_seconds": 0.0, "largest_round": 0}
        threading.Thread(target=self._loop, name="pack-rounds", daemon=True).start()

    def join(self, key: str, config: dict[str, Any], resume: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A member joins (None: the pack is full). ``resume``: a checkpoint's ``model`` (state dict),
        ``optimizer``, ``epoch``, ``best_score``, ``best_epoch``. Returns where it trains."""
        import torch

        from vae.config import TrainConfig
        from vae.model import BetaVAE

        tc = TrainConfig.from_dict(config)
        with self.cond, self.train_lock:
            self._forget_idle()
            if key not in self.trainer.members and len(self.trainer.members) >= self.capacity:
                return None
            self.trainer.remove(key)  # the same attempt joining twice starts again
            kwargs: dict[str, Any] = {}
            if resume is not None:
                model = BetaVAE.from_config(tc)
                model.load_state_dict(resume["model"])
                kwargs = {"model": model, "optimizer_state": resume["optimizer"], "epoch": int(resume["epoch"]),
                          "best_score": float(resume["best_score"]), "best_epoch": resume["best_epoch"]}
            self.trainer.add(key, tc, **kwargs)
            self.expected.add(key)
            self.seen[key] = time.monotonic()
        name = str(self.device) + (f":{torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "")
        return {"pack": self.name, "device": name}

    def epoch(self, key: str) -> dict[str, Any]:
        """Train member ``key``'s next epoch (in the next round) and return its metrics, with
        ``is_best``, ``best_epoch``, ``best_score`` and ``pack_members`` (the round's size); or
        ``{"error": ...}`` when it failed."""
        with self.cond:
            if key not in self.trainer.members:
                return {"error": f"not a member of pack {self.name} (it left, or the pack restarted)"}
            self.seen[key] = time.monotonic()
            self.waiting.append(key)
            self.cond.notify_all()
            while key not in self.results:
                self.cond.wait()
            return self.results.pop(key)

    def snapshot(self, key: str) -> dict[str, Any]:
        """Member ``key``'s checkpoint, as ``fit``'s (``vae.pack.PackTrainer.snapshot``), on the CPU."""
        with self.train_lock:
            return self.trainer.snapshot(key)

    def leave(self, key: str) -> None:
        with self.cond, self.train_lock:
            self.trainer.remove(key)
            self.expected.discard(key)
            self.seen.pop(key, None)

    def info(self) -> dict[str, Any]:
        with self.cond:
            return {**self.stats, "members": len(self.trainer.members), "pid": os.getpid(), "device": str(self.device)}

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for key, at in list(self.seen.items()):
            if now - at > IDLE_S and key not in self.waiting:
                self.trainer.remove(key)
                self.expected.discard(key)
                del self.seen[key]

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                first = time.monotonic()
                gather = min(GATHER_MAX_S, max(0.002, 0.5 * self.last_round_s))
                while not self.expected <= set(self.waiting) and time.monotonic() - first < gather:
                    self.cond.wait(timeout=max(0.0, gather - (time.monotonic() - first)))
                keys, self.waiting = list(self.waiting), []
            t0 = time.perf_counter()
            try:
                with self.train_lock:
                    out = self.trainer.round(keys)
                    extra = {k: (self.trainer.members[k].best_epoch, self.trainer.members[k].best_score)
                             for k in out if k in self.trainer.members}
            except Exception as exc:  # e.g. out of memory: every member of the round fails, as a trial would
                out, extra = {k: None for k in keys}, {}
                error = f"the pack {self.name} failed a round of {len(keys)}: {type(exc).__name__}: {exc}"
            else:
                error = None
            seconds = time.perf_counter() - t0
            with self.cond:
                self.last_round_s = seconds
                self.expected = set(out) & set(self.trainer.members)
                self.stats["rounds"] += 1
                self.stats["member_epochs"] += len(out)
                self.stats["train_seconds"] += seconds
                self.stats["largest_round"] = max(self.stats["largest_round"], len(out))
                for k in keys:
                    m = out.get(k)
                    if m is None:
                        member = self.trainer.members.get(k)
                        why = error or (member.error if member else None) or self.trainer.errors.get(k) or self._failure(k)
                        self.results[k] = {"error": why}
                    else:
                        best_epoch, best_score = extra.get(k, (None, math.inf))
                        self.results[k] = {**m, "best_epoch": best_epoch, "best_score": best_score,
                                           "pack_members": len(out)}
                self.cond.notify_all()

    def _failure(self, key: str) -> str:
        return f"member {key} of pack {self.name} did not train (it left the pack)"


def pack_name(study: str, node_id: str, device_key: str, config: Any, slot: int) -> str:
    """One pack per (study, node, device, shape), and slots past the first when one is full."""
    from vae.pack import pack_key

    shape = hashlib.sha1(repr(pack_key(config)).encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}:{study}:{node_id[:12]}:{device_key}:{shape}:{slot}"


def pack_actor(name: str, *, node_id: str, args: tuple) -> Any:
    """The named pack actor, created where it does not exist yet: detached (a member's worker
    ending does not end it), on this node, holding no resources of its own (its members' trials
    hold them; it takes their view of the GPUs from ``args``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(PackServer)
    return remote.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, num_gpus=0, max_restarts=0,
        max_concurrency=1000, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(*args)


class PackClient:
    """A trial's side of its pack: join, one epoch at a time, a snapshot where a checkpoint is due,
    leave. ``key``: this attempt of this trial (a retried attempt joins afresh)."""

    def __init__(self, study: str, tc: Any, runtime: dict[str, Any], resume: dict[str, Any] | None) -> None:
        import uuid

        import ray
        from ray import tune

        ctx = ray.get_runtime_context()
        node_id = ctx.get_node_id()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        device_key = f"gpu{visible.replace(',', '+')}" if visible and tc.device != "cpu" else "cpu"
        threads = max(1, min(os.cpu_count() or 1, int(math.ceil(runtime["pack"] * runtime.get("cpus_per_trial", 1)))))
        try:
            trial = tune.get_context().get_trial_id()
        except Exception:  # noqa: BLE001 - outside Tune (a test): any unique key will do
            trial = "trial"
        self.key = f"{trial}:{uuid.uuid4().hex[:8]}"
        # the trial's own device setting, resolved in the pack's process under this trial's GPUs:
        # "auto" on a node that declares a GPU but has no CUDA trains on the CPU, as the trial would
        device = tc.device if device_key != "cpu" else "cpu"
        args_base = (tc.to_dict(), device, tuple(runtime.get("select") or ("val_elbo", "min")), int(runtime["pack"]),
                     threads, visible if device_key != "cpu" else "")
        for slot in range(10_000):
            name = pack_name(study, node_id, device_key, tc, slot)
            actor = pack_actor(name, node_id=node_id, args=(name, *args_base))
            joined = ray.get(actor.join.remote(self.key, tc.to_dict(), resume))
            if joined is not None:
                self.actor, self.facts = actor, joined
                return
        raise RuntimeError("no pack slot left")  # pragma: no cover

    def epoch(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.epoch.remote(self.key))

    def snapshot(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.snapshot.remote(self.key))

    def leave(self) -> None:
        import ray

        try:
            ray.get(self.actor.leave.remote(self.key), timeout=30)
        except Exception:  # noqa: BLE001 - the pack is gone: nothing is left to free
            pass


class RemoteEpochState:
    """``vae.train.EpochState`` for a member of a pack: its epoch's facts at once, its weights and
    Adam state fetched from the pack only when a checkpoint asks for them."""

    def __init__(self, client: PackClient, result: dict[str, Any], tc: Any) -> None:
        self.client, self.tc = client, tc
        self.epoch = result["epoch"]
        self.is_best = bool(result["is_best"])
        self.best_epoch = result["best_epoch"]
        self.best_score = float(result["best_score"])
        self._snap: dict[str, Any] | None = None

    def _fetch(self) -> dict[str, Any]:
        if self._snap is None:
            self._snap = self.client.snapshot()
        return self._snap

    @property
    def best_state(self) -> dict[str, Any] | None:
        return self._fetch()["best_state"]

    @property
    def model(self) -> Any:
        from vae.model import BetaVAE

        model = BetaVAE.from_config(self.tc)
        model.load_state_dict(self._fetch()["model"])
        return model

    @property
    def optimizer(self) -> Any:
        state = self._fetch()["optimizer"]

        class _Saved:
            def state_dict(self) -> dict[str, Any]:
                return state

        return _Saved()


def pack_actors(study: str) -> list[Any]:
    """This study's live pack actors (handles)."""
    import ray

    prefix = f"{NAME_PREFIX}:{study}:"
    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == NAMESPACE and entry.get("name", "").startswith(prefix):
            try:
                out.append(ray.get_actor(entry["name"], namespace=NAMESPACE))
            except ValueError:  # it ended meanwhile
                pass
    return out


def remove_packs(study: str) -> dict[str, Any]:
    """Kill this study's pack actors (detached: they outlive their trials). Returns what they did,
    summed: packs, rounds, member_epochs, train_seconds, largest_round."""
    import ray

    actors = pack_actors(study)
    done = {"packs": len(actors), "rounds": 0, "member_epochs": 0, "train_seconds": 0.0, "largest_round": 0}
    for actor in actors:
        try:
            info = ray.get(actor.info.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - it died: what it did is lost, not the study
            info = {}
        for k in ("rounds", "member_epochs", "train_seconds"):
            done[k] += info.get(k, 0)
        done["largest_round"] = max(done["largest_round"], info.get("largest_round", 0))
        ray.kill(actor)
    return done
