"""Test set-up: four fake CPU devices, so pmap and sharding tests run anywhere.

Compiled programs go to a persistent XLA cache for the session (also read by
the subprocesses the tests start): the training tests compile the same tiny
networks many times, and every compile after the first becomes a file read.
The image scans' records (``p2p_jax.cache``) go to another folder of the
session, not the user's cache.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is first imported by any test module.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "P2P_JAX_CACHE_DIR" not in os.environ:  # The image scans' records (p2p_jax.cache), fresh each session.
  os.environ["P2P_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="p2p_jax-test-cache-")
  atexit.register(shutil.rmtree, os.environ["P2P_JAX_CACHE_DIR"], ignore_errors=True)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="p2p_jax-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from p2p_jax import checkpoint, configuration, recipe  # noqa: E402

STEPS_PER_EPOCH = 10  # For the schedules of tests that build a Pix2Pix without data.


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
  """The default config shrunk to 32 px and a 5-level U-Net: seconds per test on a CPU."""
  config = configuration.default_config()
  config.dataset = "synthetic"
  config.load_size = 36
  config.crop_size = 32
  config.batch_size = 2
  config.model.num_downs = 5
  config.model.ngf = 8
  config.model.ndf = 8
  config.model.n_layers_d = 2
  config.model.update(model_overrides)
  return config


def tiny_pix2pix(config=None, **model_overrides) -> recipe.Pix2Pix:
  """The Pix2Pix of ``config`` (``tiny_config(**model_overrides)`` by default)."""
  config = tiny_config(**model_overrides) if config is None else config
  return recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH)


def run_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """tiny_config for train_and_evaluate: 5 steps of one example per fake device.

  Checkpoints every 2 steps keeping 2, logs every 2, samples every 3, so a
  finished run shows each cadence and the save at the end (steps 4 and 5 kept).
  """
  config = tiny_config()
  config.data_dir = str(data_dir)
  config.batch_size = 4
  config.num_train_steps = 5
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.sample_every_steps = 3
  config.keep_checkpoints = 2
  config.update(overrides)
  return config


def assert_states_equal(actual, expected):
  """Bit for bit, leaf by leaf (step, RNG, parameters, batch statistics, both optimisers)."""
  leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(actual))
  expected_leaves, expected_treedef = jax.tree_util.tree_flatten(jax.device_get(expected))
  assert treedef == expected_treedef
  for leaf, expected_leaf in zip(leaves, expected_leaves):
    np.testing.assert_array_equal(leaf, expected_leaf)


def checkpoint_steps(workdir):
  return checkpoint.make_manager(workdir, create=False).all_steps()


def snapshot(directory):
  """Every file under ``directory`` with its bytes and modification time."""
  return {path: (path.read_bytes(), path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*")) if path.is_file()}


def tensorboard_events(logdir):
  """{tag: {step: value}} from the TensorBoard event files in ``logdir`` (images: encoded PNGs)."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return {tag: {event.step: tensor_util.make_ndarray(event.tensor_proto)
                for event in accumulator.Tensors(tag)}
          for tag in accumulator.Tags()[event_accumulator.TENSORS]}


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """config.data_dir of every training test: the synthetic dataset is made once, in tmp."""
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, synthetic_dir):
  """(config, workdir) of a finished run_config run, shared by the trainer and entry point tests."""
  # Imported here, not at the top: it imports TensorFlow, whose start-up lines would otherwise
  # end the log of pytest-xdist's controller process, which runs no test.
  from p2p_jax import trainer  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  config = run_config(synthetic_dir)
  workdir = tmp_path_factory.mktemp("finished")
  trainer.train_and_evaluate(config, workdir)
  return config, workdir
