"""What a study keeps of its trials' checkpoints (``--keep``, ``[study] keep``).

While a trial runs, Tune keeps its newest two checkpoints (``study.runner.recipes.KEEP_CHECKPOINTS``), each
with ``model.pt`` (the best weights so far: what the report and ``evaluate`` read) and
``state.pt`` (the current weights and the optimiser's state: what an exact resume or retry
continues from). Once a trial has finished (its trials row is written) nothing will continue it,
so its optimiser state and its older checkpoint go, and of its best weights the policy keeps:

- ``all`` (the default): every finished trial's best weights (2.6 MB for the default MLP);
- ``top-K``: the best K trials' by the study objective (``study.results.rank``), the others'
  weights deleted as they drop out;
- ``winner``: the best trial's alone (``top-1``).

A failed trial keeps nothing. The refit trains the winner's configuration from scratch, and
``resume`` never continues a finished trial, so both work under every policy; the report needs the
weights of the trial it analyses (the winner unless ``--trial`` names another). A trial's row keeps
the path where its weights were saved, whether they are kept or not.
"""
from __future__ import annotations

import math
from typing import Any

from study.results import tables
from study.spec import top_k
from study.store import Location, TUNE_DIR


def kept(trials: Any, keep: str, mode: str) -> set[str]:
    """The trials whose best weights a policy keeps, of a trials table (search rows only)."""
    ranked = tables.rank(trials, mode)
    k = top_k(keep)
    return set(map(str, (ranked if k is None else ranked.head(k))["trial_id"]))


class Retention:
    """Applies the policy as trials finish (the recorder calls :meth:`finished` once a trial's row
    is written), and once over the whole study at its end (:meth:`sweep`)."""

    def __init__(self, study: Location, keep: str, mode: str) -> None:
        self.study, self.k, self.mode = study, top_k(keep), mode
        self.keep = keep
        self.best: list[tuple[tuple, str]] | None = []  # (rank key, trial id), best first; None: read again

    def attach(self, study: Location) -> None:
        """A resumed study: the ranking is read again from its rows when first needed."""
        self.study, self.best = study, None

    def finished(self, trial_id: str, row: dict[str, Any]) -> None:
        keep_weights = row["status"] in tables.FINISHED and _usable(row.get("objective"))
        dropped: list[str] = []
        if keep_weights and self.k is not None:
            best = self._ranking()
            best.append((self._key(row, trial_id), trial_id))
            best.sort()
            dropped = [tid for _, tid in best[self.k:]]
            del best[self.k:]
            keep_weights = trial_id not in dropped
        folder = f"{TUNE_DIR}/trial_{trial_id}"
        # A trial that ran all its epochs saved no optimiser state in its last checkpoint (study.runner.trainable)
        state = set() if row["status"] == "completed" else {"state.pt"}
        listing = {n: set(state) for n in self.study.folders(folder) if n.startswith("checkpoint_")}
        prune(self.study, trial_id, keep_weights=keep_weights, newest=_checkpoint_dir(row.get("checkpoint")),
              listing=listing)
        for tid in dropped:
            if tid != trial_id:
                prune(self.study, tid, keep_weights=False)

    def sweep(self, trials: Any) -> None:
        """The policy over every finished trial, from one listing of the study's checkpoints: a
        resumed study's trials that finished before the crash were never pruned by this driver."""
        search = tables.search_trials(trials)
        keep = kept(search, self.keep, self.mode)
        found: dict[str, dict[str, set[str]]] = {}  # trial -> checkpoint -> its files
        for path in self.study.walk(TUNE_DIR):
            parts = path.split("/")
            if len(parts) >= 4 and parts[1].startswith("trial_") and parts[2].startswith("checkpoint_"):
                found.setdefault(parts[1].removeprefix("trial_"), {}).setdefault(parts[2], set()).add(parts[3])
        for row in search.to_dict("records"):
            tid = str(row["trial_id"])
            if tid in found:
                prune(self.study, tid, keep_weights=tid in keep, newest=_checkpoint_dir(row.get("checkpoint")),
                      listing=found[tid])

    def _ranking(self) -> list[tuple[tuple, str]]:
        if self.best is None:
            rows = tables.search_trials(tables.load(self.study)) if self.study.is_dir("trials") else None
            self.best = [] if rows is None or not len(rows) else [
                (self._key(r, str(r["trial_id"])), str(r["trial_id"])) for r in rows.to_dict("records")
                if r["status"] in tables.FINISHED and _usable(r.get("objective"))]
            self.best.sort()
        return self.best

    def _key(self, row: dict[str, Any], trial_id: str) -> tuple:
        """The order of ``study.results.rank``: the objective (best first), then val -ELBO, then the id."""
        objective = float(row["objective"])
        return (objective if self.mode == "min" else -objective, float(row.get("val_elbo") or math.inf), trial_id)


def _usable(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(float(value))


def _checkpoint_dir(path: Any) -> str | None:
    """The checkpoint folder's name of a row's ``checkpoint`` (``tune/trial_x/checkpoint_n/model.pt``)."""
    if not isinstance(path, str):
        return None
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else None


def prune(study: Location, trial_id: str, *, keep_weights: bool, newest: str | None = None,
          listing: dict[str, set[str]] | None = None) -> None:
    """Delete what a finished trial no longer needs: every checkpoint but ``newest`` (its row's;
    else the newest by name), and of that one the optimiser state, or all of it unless
    ``keep_weights``. ``listing``: its checkpoints and their files, where the caller has listed
    them already (else they are listed here)."""
    folder = f"{TUNE_DIR}/trial_{trial_id}"
    if listing is None:
        listing = {n: {"state.pt"} for n in study.folders(folder) if n.startswith("checkpoint_")}
    if not listing:
        return
    newest = newest if newest in listing else max(listing)
    for name, files in sorted(listing.items()):
        if keep_weights and name == newest:
            if "state.pt" in files:
                study.delete(f"{folder}/{name}/state.pt")
        else:
            study.delete_tree(f"{folder}/{name}")
