from __future__ import annotations

import numpy as np
import pytest

from vae.config import ConfigError, TrainConfig


def test_defaults_are_valid():
    c = TrainConfig()
    assert c.val_fraction == 0.2 and c.arch == "mlp" and c.hidden == 400


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("latent_dim", 0, ["latent_dim", "0", "between 1 and"]),
        ("latent_dim", 10**6, ["latent_dim", "1000000", "1024"]),
        ("beta", 0.0, ["beta", "> 0"]),
        ("beta", -1.0, ["beta", "-1.0"]),
        ("lr", 0.0, ["lr", "> 0"]),
        ("lr", -0.1, ["lr"]),
        ("batch_size", 0, ["batch_size", "0"]),
        ("epochs", 0, ["epochs", "0"]),
        ("arch", "resnet", ["arch", "resnet", "mlp", "conv"]),
        ("dataset", "cifar", ["dataset", "cifar", "mnist-sample"]),
        ("device", "tpu", ["device", "tpu"]),
        ("val_fraction", 1.0, ["val_fraction"]),
        ("latent_dim", "ten", ["latent_dim", "wrong type", "integer"]),
        ("latent_dim", 2.5, ["latent_dim", "integer"]),
        ("beta", "big", ["beta", "number"]),
        ("epochs", True, ["epochs", "integer"]),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match="unknown config key 'latnet_dim'.*latent_dim"):
        TrainConfig.from_dict({"latnet_dim": 4})


def test_numpy_scalars_from_search_spaces_are_accepted_and_normalised():
    c = TrainConfig(latent_dim=np.int64(7), beta=np.float32(0.5), lr=np.float64(1e-3))
    assert type(c.latent_dim) is int and type(c.beta) is float and c.latent_dim == 7


def test_frozen():
    with pytest.raises(Exception):
        TrainConfig().beta = 2.0  # type: ignore[misc]
