"""The cluster: where a study's trials run.

Owns: Ray's start or the address of a running cluster, what it offers (slots, GPUs, an
autoscaler) and the checks before a study starts (GPUs, storage every node sees), in
``connect``; the cluster launcher's configuration, ``vae-study cluster aws-setup`` (the IAM roles
``cluster.yaml``'s nodes run under) and ``vae-study cluster local`` (``launch``).

May import: ``study.spec``, ``study.store``, ``study.errors``. A new kind of cluster (a
launcher provider, a scheduler other than Ray's own) goes here.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("PROBE_TIMEOUT_S", "init_ray", "ClusterView", "view", "autoscaler_running", "slots",
                     "default_concurrency", "check_gpus", "check_storage_visible", "free_resources",
                     "autoscaler_note", "summarize_launches"), ".connect"),
    **dict.fromkeys(("read_config", "storage_of", "bucket_of", "with_storage", "local_config", "aws_setup",
                     "gpu_quotas"), ".launch"),
})
