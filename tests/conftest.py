"""Test set-up: four fake CPU devices, so pmap and sharding tests run anywhere."""

import os

# Must happen before jax is first imported by any test module.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import default  # noqa: E402


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
  """The default config shrunk to 32 px and a 5-level U-Net: seconds per test on a CPU."""
  config = default.get_config()
  config.dataset = "synthetic"
  config.load_size = 36
  config.crop_size = 32
  config.batch_size = 2
  config.steps_per_epoch = 10
  config.model.num_downs = 5
  config.model.ngf = 8
  config.model.ndf = 8
  config.model.n_layers_d = 2
  config.model.update(model_overrides)
  return config


@pytest.fixture
def config():
  return tiny_config()
