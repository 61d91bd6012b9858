"""Orbax checkpoints: exact round trip, restoring onto another device layout, errors, refusals."""

import asyncio
import errno
import logging
import pathlib
import threading
import time

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


def _largest_state_file(workdir, step):
  files = [p for p in pathlib.Path(checkpoint.checkpoint_dir(workdir), str(step), "state").rglob("*")
           if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("seed", range(5))
def test_bytes_overwritten_in_place_are_found_and_named(tmp_path, trained, seed):
  """4 KB of random bytes at a random offset of the largest data file: an error, never a silent load."""
  config, state = trained
  _save(tmp_path, config, state, [1])
  path = _largest_state_file(tmp_path, 1)
  rng = np.random.default_rng(seed)
  data = bytearray(path.read_bytes())
  offset = int(rng.integers(0, len(data) - 4096))
  data[offset:offset + 4096] = rng.bytes(4096)
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=rf"Checkpoint 1 in {tmp_path}/checkpoints is damaged: the state array \S+ "
                           r"(does not match the checksum|cannot be read)") as caught:
    checkpoint.load_state(tmp_path)
  assert "\n" not in str(caught.value)


def test_an_array_that_differs_from_its_checksum_is_named(tmp_path, trained, monkeypatch):
  """Bytes that still decode (the case compression cannot see) are caught by the checksums."""
  config, state = trained
  kernel = state.g_params["up_0"]["kernel"]
  changed = state.replace(g_params={**state.g_params, "up_0": {**state.g_params["up_0"],
                                                               "kernel": kernel.at[0, 0, 0, 0].add(1e-3)}})
  checksums = checkpoint.array_checksums(state)  # Saved with `changed`: as if its bytes changed on disk.
  monkeypatch.setattr(checkpoint, "array_checksums", lambda _: checksums)
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, changed, 1, config, tiny_pix2pix(config))
  manager.wait_until_finished()
  monkeypatch.undo()
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"is damaged: the state array g_params/up_0/kernel does not match the checksum"):
    checkpoint.load_state(tmp_path)


def test_checksums_see_a_change_of_one_bit_anywhere(trained):
  _, state = trained
  kernel = np.asarray(state.g_params["up_0"]["kernel"])
  before = checkpoint.array_checksums(kernel)
  for index in (0, kernel.size // 2, kernel.size - 1):
    flipped = kernel.copy().reshape(-1)
    flipped.view(np.uint32)[index] ^= 1 << (index % 32)
    assert checkpoint.array_checksums(flipped.reshape(kernel.shape)) != before


def _reference_sums(array: np.ndarray):
  """The checksums' definition in NumPy: two position-weighted sums of the array's words, mod 2^32."""
  array = np.ascontiguousarray(array).reshape(-1)
  words = (array.astype(np.uint32) if array.dtype == np.bool_
           else array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize]).astype(np.uint32))
  i = np.arange(words.size, dtype=np.uint32)
  first = np.sum(words * (2 * i + 1), dtype=np.uint32)
  second = np.sum((words ^ (words >> 13)) * ((i * np.uint32(0x9E3779B1) + np.uint32(0x7F4A7C15)) | 1),
                  dtype=np.uint32)
  return [int(first), int(second)]


def test_checksums_are_those_earlier_checkpoints_were_saved_with(trained):
  """The sums are defined by their formula: checkpoints written by earlier versions must still verify."""
  _, state = trained
  arrays = {"kernel": np.asarray(state.g_params["up_0"]["kernel"]), "step": np.asarray(state.step),
            "rng": np.asarray(state.rng), "bf16": np.linspace(-3, 3, 1001).astype(jnp.bfloat16),
            "mask": np.arange(77) % 3 == 0, "bytes": np.arange(300).astype(np.uint8)}
  sums = checkpoint.array_checksums(arrays)
  assert sums == {name: _reference_sums(array) for name, array in arrays.items()}


def test_checksums_keep_no_copy_of_the_state():
  """Saving and restoring ran the checksums over the whole state; they must not hold it twice over.

  Written as two reductions, XLA kept every array's words and weights: around
  them a 256 px state's process went from 970 to 2458 MiB (BENCHMARKS.md).
  """
  leaves = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in [(4, 4, 256, 512), (4, 4, 512, 256), (512,)]]
  memory = checkpoint._sums.lower(leaves).compile().memory_analysis()  # pylint: disable=protected-access
  assert memory.temp_size_in_bytes < memory.argument_size_in_bytes / 100


@pytest.mark.parametrize("damage, what", [
    ("truncate", r"the state array \S+ cannot be read \(.*\); a file under .*/checkpoints/2 is truncated"),
    ("empty_metadata", r"\S+/checkpoints/2/state/_METADATA is empty\."),
    ("bad_checksums", r"\S+/checkpoints/2/checksums/metadata is not valid JSON"),
])
def test_a_damaged_latest_checkpoint_is_one_line_that_names_the_intact_ones(tmp_path, trained, damage, what):
  config, state = trained
  _save(tmp_path, config, state, [1, 2])
  step_dir = pathlib.Path(checkpoint.checkpoint_dir(tmp_path), "2")
  if damage == "truncate":
    path = _largest_state_file(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif damage == "empty_metadata":
    (step_dir / "state" / "_METADATA").write_text("")
  else:
    (step_dir / "checksums" / "metadata").write_text('{"g_params/up_0/kernel": [1, ')
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=rf"^Checkpoint 2 in \S+ is damaged: {what}.* Intact: \[1\]; pick one with step=1\.$"):
    checkpoint.load_state(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(checkpoint.load_state(tmp_path, step=1)),
                         jax.device_get(state))


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, trained, monkeypatch):
  config, state = trained
  manager = _save(tmp_path, config, state, [1])
  monkeypatch.setattr(checkpoint, "_free_bytes", lambda directory: 10_000)
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=rf"Not enough space for checkpoint 2 in {tmp_path}/checkpoints: it needs about "
                           r"[\d.]+ MB, the disk has 0.0 MB free\. The checkpoints already there are kept"):
    checkpoint.save(manager, state, 2, config, tiny_pix2pix(config))
  assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["1"]


def _fail_writes(monkeypatch):
  """Every array write of orbax's background thread fails as on a full disk."""
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top

  def no_space(array):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(serialization, "estimate_write_memory_footprint", no_space)


def test_a_partial_save_is_removed_even_while_its_last_writes_land(tmp_path):
  """A failed save's thread reports its first error while other arrays are still being written."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  partial = tmp_path / "4.orbax-checkpoint-tmp"
  stop = threading.Event()

  def keep_writing():  # As tensorstore does: each write creates its directories.
    for i in range(30):
      (partial / "state" / "ocdbt.process_0").mkdir(parents=True, exist_ok=True)
      (partial / "state" / "ocdbt.process_0" / f"d{i}").write_bytes(b"x" * 1024)
      time.sleep(0.01)
    stop.set()

  writer = threading.Thread(target=keep_writing)
  writer.start()
  time.sleep(0.05)
  checkpoint._remove_partial_save(epath.Path(partial))  # pylint: disable=protected-access
  writer.join()
  assert stop.is_set() and not partial.exists()


def test_a_save_that_fails_in_the_background_is_reported_and_cleaned_up(tmp_path, trained, monkeypatch):
  config, state = trained
  manager = _save(tmp_path, config, state, [1])
  _fail_writes(monkeypatch)
  checkpoint.save(manager, state, 2, config, tiny_pix2pix(config))  # Returns: the write runs in a thread.
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=rf"^Saving checkpoint 2 to {tmp_path}/checkpoints failed: .*No space left on device"
                           r".*; the disk has [\d.]+ MB free, a checkpoint takes [\d.]+ MB\. Its partial files "
                           r"were removed and the checkpoints before it are kept"):
    while True:  # What the training loop does every step: look without waiting.
      checkpoint.check_saved(manager, 2)
      time.sleep(0.05)
  assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["1"]
  monkeypatch.undo()
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(checkpoint.load_state(tmp_path)),
                         jax.device_get(state))


def test_orbax_reads_failing_as_their_event_loop_shuts_down_are_not_reported(caplog):
  """A damaged array fails its read while asyncio.run() cancels the others: one error line is enough."""
  checkpoint._quiet_abandoned_io()
  orbax_code = {}
  exec(compile("async def read():\n  raise ValueError('damaged')\n",  # pylint: disable=exec-used
               "/site-packages/orbax/checkpoint/serialization.py", "exec"), orbax_code)

  async def elsewhere():
    raise ValueError("not orbax")

  def fail_at_shutdown(coroutine):
    loop = asyncio.new_event_loop()
    task = loop.create_task(coroutine())
    loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    loop.call_exception_handler({"message": "unhandled exception during asyncio.run() shutdown",
                                 "exception": task.exception(), "task": task})
    loop.close()

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    fail_at_shutdown(orbax_code["read"])
    fail_at_shutdown(elsewhere)
  reported = [record.getMessage() for record in caplog.records if record.name == "asyncio"]
  assert len(reported) == 1 and "elsewhere" in reported[0], reported
