"""How many aten operations a pack dispatches, per training step and per round: on a GPU each
is about one kernel launch (view operations aside), and a small model's step is bound by
launches, so this counts what a GPU would pay for the pack's Python-side work. Deterministic:
it does not depend on this machine's speed.

Each K is counted at two round lengths (``--images`` and twice as many training images, the
same validation split), so a round's operations split into a part per training step (the
difference, over the extra steps) and a part per round (validation, the best epoch's weights,
the round's set-up): ops(round) = per_round + steps x per_step. An epoch of full MNIST at batch
32 is 1,563 steps, so there the per-step part is nearly all of it.

    python benchmarks/pack_ops.py --ks 1,16,128
    PYTHONPATH=/tmp/base python benchmarks/pack_ops.py --ks 1,16,128   # a worktree of an earlier commit
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

VIEWS = ("view", "slice", "select", "unsqueeze", "reshape", "expand", "detach", "_unsafe_view", "t.default", "alias",
         "transpose", "resize_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,16,128")
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from torch.utils._python_dispatch import TorchDispatchMode

    import vae.pack
    from vae.config import TrainConfig
    from vae.data import load

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    def kernels(ops: collections.Counter) -> collections.Counter:
        return collections.Counter({op: n for op, n in ops.items() if not any(v in op for v in VIEWS)})

    def one_round(k: int, images: int) -> tuple[int, collections.Counter]:
        cfgs = [TrainConfig(dataset="mnist-sample", max_train_images=images, epochs=2, latent_dim=2 + (7 * i) % 63,
                            beta=0.1 * (1.5 ** (i % 12)), lr=1e-4 * (1.2 ** (i % 20)), seed=i, augment="shift")
                for i in range(k)]
        try:  # what a GPU runs: Adam over one flat buffer (a CPU's default is per tensor)
            trainer = vae.pack.PackTrainer(load(cfgs[0]), flat_adam=True)
        except TypeError:  # a version from before the flat Adam
            trainer = vae.pack.PackTrainer(load(cfgs[0]))
        for i, c in enumerate(cfgs):
            trainer.add(i, c)
        trainer.round(list(range(k)))  # the stack is built; the next round counts
        count = Count()
        with count:
            trainer.round(list(range(k)))
        return (images + cfgs[0].batch_size - 1) // cfgs[0].batch_size, count.ops

    rows = []
    for k in map(int, args.ks.split(",")):
        (s1, ops1), (s2, ops2) = one_round(k, args.images), one_round(k, 2 * args.images)
        k1, k2 = kernels(ops1), kernels(ops2)
        per_step = (sum(k2.values()) - sum(k1.values())) / (s2 - s1)
        per_round = sum(k1.values()) - s1 * per_step
        step_ops = {op: (k2[op] - k1[op]) / (s2 - s1) for op in k2 if k2[op] != k1[op]}
        row = {"k": k, "steps": [s1, s2], "ops": [sum(ops1.values()), sum(ops2.values())],
               "kernels": [sum(k1.values()), sum(k2.values())], "kernels_per_step": per_step,
               "kernels_per_step_per_member": per_step / k, "kernels_per_round": per_round,
               "per_step": dict(sorted(step_ops.items(), key=lambda kv: -kv[1])[:14])}
        rows.append(row)
        print(f"K {k:>4}  kernels (views left out) a step {per_step:>7,.1f} ({per_step / k:6.2f} a member), "
              f"a round besides {per_round:>8,.0f}; a step: "
              + ", ".join(f"{op.removeprefix('aten.')} {n:g}" for op, n in list(row["per_step"].items())[:8]),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
