"""Replays benchmarks/curves.py's table in place of vae.train.fit in every process started with
this folder on PYTHONPATH and VAE_REPLAY_CURVES set (Ray's workers, the peers' worker processes):
``bench_peers.py --replay`` sets both. Nothing else is changed."""
import os
import sys

if os.environ.get("VAE_REPLAY_CURVES"):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))  # benchmarks/, for curves.py
    import curves

    curves.install()
