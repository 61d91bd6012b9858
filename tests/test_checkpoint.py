"""Orbax checkpoints: exact round trip, restoring onto another device layout, errors, refusals."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from p2p_jax import checkpoint, configuration, parallel, train
from tests.conftest import tiny_config, tiny_pix2pix


@pytest.fixture(scope="module")
def trained():
  """A state whose every array holds distinct values (as after training), without compiling a step."""
  config = tiny_config()
  state = train.create_train_state(jax.random.key(0), tiny_pix2pix(config), configuration.image_shapes(config))
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [x + jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x + 1
           for x, k in zip(leaves, keys)]
  return config, jax.tree_util.tree_unflatten(treedef, noisy)


def _save(workdir, config, state, steps, max_to_keep=None):
  manager = checkpoint.make_manager(workdir, max_to_keep=max_to_keep)
  for step in steps:
    checkpoint.save(manager, state, step, config, tiny_pix2pix(config))
  manager.wait_until_finished()
  return manager


def test_round_trip_is_exact_and_keeps_the_config(tmp_path, trained):
  config, state = trained
  _save(tmp_path, config, state, [1])
  restored = checkpoint.load_state(tmp_path)
  assert isinstance(restored, train.TrainState)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  assert checkpoint.load_config(tmp_path).to_dict() == config.to_dict()


def test_restores_onto_a_mesh_of_another_size(tmp_path, trained):
  """Written from one device, read back replicated over four (and the data position with it)."""
  config, state = trained
  manager = _save(tmp_path, config, state, [7])
  replicated = NamedSharding(parallel.make_mesh(jax.devices()[:4]), P())
  restored, start_step = checkpoint.restore(manager, 7, tiny_pix2pix(config), configuration.image_shapes(config),
                                            replicated)
  assert start_step == 7
  kernel = restored.g_params["up_0"]["kernel"]
  assert kernel.sharding == replicated and len(kernel.addressable_shards) == 4
  np.testing.assert_array_equal(kernel, state.g_params["up_0"]["kernel"])


def test_keeps_the_latest_checkpoints_and_loads_any_kept_step(tmp_path, trained):
  config, state = trained
  manager = _save(tmp_path, config, state, [1, 2, 3], max_to_keep=2)
  assert manager.all_steps() == [2, 3]
  assert checkpoint.load_config(tmp_path, step=2).to_dict() == config.to_dict()
  with pytest.raises(ValueError, match=r"No checkpoint for step 1 in .*checkpoints; it holds steps \[2, 3\]"):
    checkpoint.load_state(tmp_path, step=1)


def test_an_empty_workdir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"No checkpoint in {tmp_path}/checkpoints: train"):
    checkpoint.load_state(tmp_path)
  assert not (tmp_path / "checkpoints").exists(), "reading must not create anything"


def test_compatibility_names_each_differing_key_and_allows_resumable_ones():
  saved = tiny_config()
  config = tiny_config(ngf=16)
  config.seed = 3
  config.num_train_steps, config.log_every_steps = 500, 7  # free to change on resume
  with pytest.raises(ValueError, match=r"config.model.ngf: 8 in the checkpoint, 16 now; "
                                       r"config.seed: 0 in the checkpoint, 3 now\)"):
    configuration.check_compatible(saved, config, "workdir=/w")
  config.model.ngf, config.seed = 8, 0
  configuration.check_compatible(saved, config, "workdir=/w")
