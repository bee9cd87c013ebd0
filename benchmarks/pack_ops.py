"""How many aten operations one pack round dispatches, per training step and per member: on a GPU
each is about one kernel launch (view operations aside), and a small model's step is bound by
launches, so this counts what a GPU would pay for the pack's Python-side work. Deterministic:
it does not depend on this machine's speed.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,16,128")
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
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

    rows = []
    for k in map(int, args.ks.split(",")):
        cfgs = [TrainConfig(dataset="mnist-sample", max_train_images=args.images, epochs=2, latent_dim=2 + (7 * i) % 63,
                            beta=0.1 * (1.5 ** (i % 12)), lr=1e-4 * (1.2 ** (i % 20)), seed=i, augment="shift")
                for i in range(k)]
        data = load(cfgs[0])
        trainer = vae.pack.PackTrainer(data)
        for i, c in enumerate(cfgs):
            trainer.add(i, c)
        trainer.round(list(range(k)))  # the stack is built; the next round counts
        count = Count()
        with count:
            trainer.round(list(range(k)))
        steps = (args.images + cfgs[0].batch_size - 1) // cfgs[0].batch_size
        total = sum(count.ops.values())
        views = sum(n for op, n in count.ops.items() if any(v in op for v in ("view", "slice", "select", "unsqueeze",
                                                                               "reshape", "expand", "detach", "_unsafe_view", "t.default", "alias")))
        row = {"k": k, "steps": steps, "ops": total, "views": views, "ops_per_step": total / steps,
               "ops_per_step_per_member": total / steps / k, "top": count.ops.most_common(12)}
        rows.append(row)
        print(f"K {k:>4}  {total:>8,} aten ops in a round of {steps} steps (views {views:,}): "
              f"{total / steps:>8,.0f} a step, {total / steps / k:6.1f} a step per member", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
