"""train_and_evaluate on synthetic data: cadences, outputs, exact resumption, stops, refusals."""

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from p2p_jax import checkpoint, configuration, input_pipeline, locking, recipe, runtime, summaries, trainer
from tests.conftest import (assert_states_equal, checkpoint_steps, run_config, snapshot,
                            tensorboard_events, tiny_config, tiny_pix2pix)


class _Stream:
  """A training stream that hands out ``hook(batch)`` instead of its batch number ``at``."""

  def __init__(self, dataset, at, hook):
    self.dataset, self.at, self.hook = dataset, at, hook

  def as_numpy_iterator(self):
    for index, batch in enumerate(self.dataset.as_numpy_iterator(), start=1):
      yield self.hook(batch) if index == self.at else batch


def _hook_first_stream(monkeypatch, at, hook):
  """Makes the next run's stream a _Stream (not a resumed run's); returns each stream's start step."""
  make_train_dataset = input_pipeline.make_train_dataset
  start_steps = []

  def stream(config, *, start_step=0, **kwargs):
    start_steps.append(start_step)
    dataset = make_train_dataset(config, start_step=start_step, **kwargs)
    return _Stream(dataset, at, hook) if len(start_steps) == 1 else dataset

  monkeypatch.setattr(input_pipeline, "make_train_dataset", stream)
  return start_steps


def _sigterm(batch):
  os.kill(os.getpid(), signal.SIGTERM)
  return batch


def test_keeps_the_latest_checkpoints_saved_every_n_steps_and_at_the_end(finished_run):
  config, workdir = finished_run
  assert checkpoint_steps(workdir) == [4, 5]  # 2 and 4 by the cadence, 5 at the end; 2 not kept.
  assert int(checkpoint.load_state(workdir).step) == 5
  assert int(checkpoint.load_state(workdir, step=4).step) == 4
  saved = checkpoint.load_config(workdir)
  assert saved.to_dict() == config.to_dict(), "the config as given: nothing derived is written into it"


def test_tensorboard_has_the_losses_and_the_sample_sheets(finished_run):
  _, workdir = finished_run
  events = tensorboard_events(workdir)
  for name in tiny_pix2pix().metric_names + ("learning_rate",):
    assert sorted(events[name]) == [2, 4, 5], name  # every log_every_steps, and at the last save
    assert all(np.isfinite(value) for value in events[name].values()), name
  assert sorted(events["steps_per_second"]) == [4, 5]
  assert sorted(events["samples"]) == [3, 5]


def test_sample_sheets_show_the_same_eval_images_over_time(finished_run):
  """Columns input | generated | target | |error|, for a fixed set of eval images."""
  config, workdir = finished_run
  samples = workdir / summaries.SAMPLES_DIR
  names = sorted(p.name for p in samples.glob("step_*.png"))
  assert names == ["step_00000003.png", "step_00000005.png"]
  size = config.crop_size
  sheets = []
  for name in names:
    with Image.open(samples / name) as sheet:
      sheets.append(np.asarray(sheet).astype(int))
  assert sheets[0].shape == (config.num_sample_images * size, 4 * size, 3)
  inputs, generated, targets, errors = (
      [sheet[:, i * size:(i + 1) * size] for sheet in sheets] for i in range(4))
  np.testing.assert_array_equal(inputs[0], inputs[1])
  np.testing.assert_array_equal(targets[0], targets[1])
  assert not np.array_equal(generated[0], generated[1])
  for gen, target, error in zip(generated, targets, errors):
    np.testing.assert_allclose(error, np.abs(gen - target).mean(-1, keepdims=True).repeat(3, -1),
                               atol=2)
  index = (samples / "index.html").read_text()
  assert index.index('src="step_00000005.png"') < index.index('src="step_00000003.png"')


def test_running_a_finished_run_again_changes_nothing(finished_run):
  config, workdir = finished_run
  before = snapshot(workdir)
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 5
  assert snapshot(workdir) == before


def test_a_run_stopped_by_sigterm_resumes_exactly_where_it_stopped(tmp_path, finished_run,
                                                                    monkeypatch):
  """Stopped after step 3 and run again with the same config: bit for bit the uninterrupted run."""
  config, finished = finished_run
  workdir = tmp_path / "stopped"
  start_steps = _hook_first_stream(monkeypatch, 3, _sigterm)
  handler = signal.getsignal(signal.SIGTERM)
  stopped = trainer.train_and_evaluate(config, workdir)
  assert int(stopped.step) == 3
  assert checkpoint_steps(workdir) == [2, 3]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, data_position = checkpoint.restore(checkpoint.make_manager(workdir, create=False), 3,
                                        tiny_pix2pix(config), configuration.image_shapes(config), one_device)
  assert data_position == 3
  assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's handler is gone again

  trainer.train_and_evaluate(config, workdir)
  assert start_steps == [0, 3]
  assert checkpoint_steps(workdir) == [4, 5]
  assert_states_equal(checkpoint.load_state(workdir), checkpoint.load_state(finished))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_set_up_stops_before_the_first_step(tmp_path, synthetic_dir, monkeypatch,
                                                             signum):
  """Without the trainer's handler this test's own handler would raise."""
  make_train_dataset = input_pipeline.make_train_dataset

  def signalled_stream(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return make_train_dataset(*args, **kwargs)

  def unhandled(signum, frame):
    raise AssertionError(f"{signal.Signals(signum).name} reached the default handler")

  monkeypatch.setattr(input_pipeline, "make_train_dataset", signalled_stream)
  previous = signal.signal(signum, unhandled)
  try:
    state = trainer.train_and_evaluate(run_config(synthetic_dir), tmp_path)
  finally:
    signal.signal(signum, previous)
  assert int(state.step) == 0
  assert checkpoint_steps(tmp_path) == []


def test_a_non_finite_loss_names_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, synthetic_dir, monkeypatch):
  """A NaN batch at step 3, found when step 4 is to be saved: nothing after step 2 is written."""
  _hook_first_stream(monkeypatch, 3, lambda batch: {**batch, "A": np.full_like(batch["A"], np.nan)})
  config = run_config(synthetic_dir, log_every_steps=100, sample_every_steps=100)
  checkpoints = re.escape(str(checkpoint.checkpoint_dir(tmp_path)))
  with pytest.raises(trainer.NonFiniteError, match=(
      rf"Step 3 gave a non-finite loss \(.*g_loss=nan\); stopped without saving anything after "
      rf"it. The checkpoints in {checkpoints} are kept; lower config.optim.lr or check the data")):
    trainer.train_and_evaluate(config, tmp_path)
  assert checkpoint_steps(tmp_path) == [2]
  assert int(checkpoint.load_state(tmp_path).step) == 2


def test_all_finite_looks_at_every_float_leaf(finished_run):
  state = checkpoint.load_state(finished_run[1])
  assert trainer._all_finite(state)
  for bad in (jnp.nan, jnp.inf):
    kernel = state.d_params["conv_0"]["kernel"]
    poisoned = state.replace(d_params={**state.d_params, "conv_0": {
        **state.d_params["conv_0"], "kernel": kernel.at[0, 0, 0, 0].set(bad)}})
    assert not trainer._all_finite(poisoned)


def test_a_non_finite_state_after_finite_losses_is_not_saved(tmp_path, synthetic_dir, monkeypatch):
  """As after an overflowing update: the check before saving step 4 finds the state bad."""
  monkeypatch.setattr(trainer, "_all_finite", lambda state: jnp.asarray(int(state.step) != 4))
  config = run_config(synthetic_dir, log_every_steps=100, sample_every_steps=100)
  checkpoints = re.escape(str(checkpoint.checkpoint_dir(tmp_path)))
  with pytest.raises(trainer.NonFiniteError, match=(
      rf"The state after step 4 is not finite; it was not saved. The checkpoints in {checkpoints} "
      r"are kept")):
    trainer.train_and_evaluate(config, tmp_path)
  assert checkpoint_steps(tmp_path) == [2]


def test_an_incompatible_config_is_refused_and_the_checkpoints_untouched(tmp_path, finished_run):
  config, finished = finished_run
  shutil.copytree(checkpoint.checkpoint_dir(finished), checkpoint.checkpoint_dir(tmp_path))
  before = snapshot(tmp_path)
  other = config.copy_and_resolve_references()
  other.model.ngf, other.seed = 16, 1
  other.num_train_steps, other.keep_checkpoints = 50, 1  # free to change on resume
  with pytest.raises(ValueError, match=(
      rf"workdir={re.escape(str(tmp_path))} holds a checkpoint of a different run "
      r"\(config.model.ngf: 8 in the checkpoint, 16 now; config.seed: 0 in the checkpoint, 1 now\)"
      r". It was left untouched")):
    trainer.train_and_evaluate(other, tmp_path)
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=2), r"config.batch_size=2 must be a positive multiple of the number of devices, 4 "
                         r"\(1 process\(es\) x 4 local device\(s\)\)"),
    (dict(log_every_steps=0), r"config.log_every_steps must be a positive int, got 0"),
    (dict(keep_checkpoints=0), r"config.keep_checkpoints must be a positive int, got 0"),
    (dict(num_train_steps=-1, num_epochs=0),
     r"config.num_epochs=0 with config.num_train_steps=-1: set one of them to a positive number"),
    (dict(direction="up"), r"config.direction must be one of \('AtoB', 'BtoA'\), got 'up'"),
    (dict(eval_every_steps=-2), r"config.eval_every_steps=-2: must be 0 \(off\) or a positive number"),
    ({"loss.gan_mode": "wgan"}, r"config.loss.gan_mode='wgan' is none of \('vanilla', 'lsgan', 'hinge', "
                                r"'wgangp'\) and no import path"),
])
def test_a_bad_config_is_named_before_anything_is_written(tmp_path, synthetic_dir, overrides,
                                                          message):
  config = run_config(synthetic_dir)
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert not any(tmp_path.iterdir())


def test_eval_every_steps_writes_the_eval_metrics_to_tensorboard(tmp_path, synthetic_dir):
  config = run_config(synthetic_dir, num_train_steps=3, eval_every_steps=2, checkpoint_every_steps=10)
  trainer.train_and_evaluate(config, tmp_path / "run")
  events = tensorboard_events(tmp_path / "run")
  for name in ("l1", "psnr", "ssim", "fid", "kid", "lpips"):
    assert sorted(events[f"eval/{name}"]) == [2, 3]  # Every 2 steps and at the end.
    assert all(np.isfinite(list(events[f"eval/{name}"].values())))
  assert events["eval/fid"][2] != events["eval/fid"][3]


def test_eval_every_steps_is_refused_across_processes():
  config = run_config("unused", eval_every_steps=5)
  with pytest.raises(ValueError, match=r"config.eval_every_steps=5: evaluation during training runs in one "
                                       r"process, not 2; .*--all_checkpoints"):
    configuration.check(config, num_devices=4, num_processes=2)


def test_an_eval_split_of_single_images_is_named_before_the_train_split_is_read(tmp_path, monkeypatch):
  (tmp_path / "data" / "train").mkdir(parents=True)
  (tmp_path / "data" / "val").mkdir()
  for index in range(4):
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "data" / "train" / f"{index}.jpg")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "val" / "photo.jpg")
  read = []
  decode_all = input_pipeline.images.decode_all
  monkeypatch.setattr(input_pipeline.images, "decode_all",
                      lambda paths: read.append(paths[0].parent.name) or decode_all(paths))
  config = run_config("", dataset=str(tmp_path / "data"), eval_split="val")
  with pytest.raises(ValueError, match=r"val/photo.jpg is 8x8 \(width x height\): not an A\|B pair"):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert read == ["val"]
  assert not (tmp_path / "run").exists()


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_sets_the_damaged_one_aside(
    tmp_path, finished_run, caplog):
  """Step 5's metadata emptied: the run resumes from step 4, redoes step 5, and ends where it ended."""
  config, finished = finished_run
  shutil.copytree(checkpoint.checkpoint_dir(finished), checkpoint.checkpoint_dir(tmp_path))
  (checkpoint.checkpoint_dir(tmp_path) / "5" / "state" / "_METADATA").write_text("")
  caplog.set_level(logging.INFO)
  state = trainer.train_and_evaluate(config, tmp_path)
  assert re.search(r"First step done, [0-9.]+ s after set-up began", caplog.text)
  assert re.search(r"RESUMING FROM AN OLDER CHECKPOINT: checkpoint 5 is damaged \(\S+/5/state/_METADATA is "
                   rf"empty\.\)\. It was moved to {re.escape(str(tmp_path))}/checkpoints_damaged/5; training "
                   r"resumes from step 4", caplog.text)
  assert (tmp_path / checkpoint.DAMAGED_DIR / "5" / "state" / "_METADATA").read_text() == ""
  assert checkpoint_steps(tmp_path) == [4, 5]
  assert_states_equal(state, checkpoint.load_state(finished))
  assert_states_equal(checkpoint.load_state(tmp_path), checkpoint.load_state(finished))


def test_with_no_intact_checkpoint_resume_stops_and_moves_nothing(tmp_path, finished_run):
  config, finished = finished_run
  shutil.copytree(checkpoint.checkpoint_dir(finished), checkpoint.checkpoint_dir(tmp_path))
  for step in (4, 5):
    (checkpoint.checkpoint_dir(tmp_path) / str(step) / "state" / "_METADATA").write_text("")
  before = snapshot(tmp_path)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"Checkpoint 5 in \S+ is damaged: .*_METADATA is empty\. No checkpoint of this run is "
                           r"intact \(steps \[5, 4\] checked\); they were left in place"):
    trainer.train_and_evaluate(config, tmp_path)
  assert snapshot(tmp_path) == before


def test_a_failed_save_stops_the_run_at_the_next_step_and_keeps_the_earlier_checkpoints(
    tmp_path, synthetic_dir, monkeypatch):
  """The save of step 4 fails in its background thread as on a full disk; step 5 never runs."""
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  disk_full = [False]
  footprint = serialization.estimate_write_memory_footprint

  def write(array):
    if disk_full[0]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return footprint(array)

  save = checkpoint.save

  def save_then_fill_the_disk(manager, state, step, *args):
    disk_full[0] = step >= 4
    save(manager, state, step, *args)
    while manager.is_saving_in_progress():  # The failure is in before step 5 starts.
      time.sleep(0.01)

  monkeypatch.setattr(serialization, "estimate_write_memory_footprint", write)
  monkeypatch.setattr(checkpoint, "save", save_then_fill_the_disk)
  steps_run = _hook_first_stream(monkeypatch, 5, lambda batch: pytest.fail("step 5 ran"))
  config = run_config(synthetic_dir, num_train_steps=8, log_every_steps=100, sample_every_steps=100)
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=rf"Saving checkpoint 4 to {re.escape(str(tmp_path))}/checkpoints failed: .*No space "
                           r"left on device.*the checkpoints before it are kept"):
    trainer.train_and_evaluate(config, tmp_path)
  assert steps_run == [0]
  assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["2"]
  assert not (tmp_path / locking.LOCK_FILE).exists()


def test_on_cpu_a_save_is_written_before_the_next_step_and_freed_heap_goes_back(
    tmp_path, synthetic_dir, monkeypatch):
  """Written in the background, a save's copies of the state took the heap the step's buffers had.

  At 256 px that was 0.4-0.7 GB more peak memory per run, kept after the save
  (BENCHMARKS.md); the first step also leaves compilation's freed heap behind.
  """
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  footprint = serialization.estimate_write_memory_footprint

  managers, saving_at_step_3, trims, slow = [], [], [], [False]

  def slow_write(array):  # Orbax's background thread, on a slow disk: one pause per save.
    if slow[0]:
      slow[0] = False
      time.sleep(1.0)
    return footprint(array)

  save = checkpoint.save

  def recording_save(manager, state, step, *args):
    managers.append(manager)
    slow[0] = True
    save(manager, state, step, *args)

  def look(batch):
    saving_at_step_3.append(managers[-1].is_saving_in_progress())
    return batch

  monkeypatch.setattr(serialization, "estimate_write_memory_footprint", slow_write)
  monkeypatch.setattr(checkpoint, "save", recording_save)
  monkeypatch.setattr(runtime, "release_free_memory", lambda: trims.append(len(managers)))
  _hook_first_stream(monkeypatch, 3, look)
  trainer.train_and_evaluate(run_config(synthetic_dir), tmp_path)  # Saves after steps 2, 4 and 5.
  assert saving_at_step_3 == [False]
  assert trims == [0, 1, 2]  # After the first step, then after each save with steps after it.


def test_a_workdir_held_by_a_live_run_is_refused_at_once_and_left_untouched(tmp_path, synthetic_dir):
  """Another process holds the workdir (as a run does): this one names it and writes nothing."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from p2p_jax import locking\n"
       f"with locking.hold({str(workdir)!r}):\n  print('held', flush=True); sys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    before = snapshot(workdir)
    with pytest.raises(locking.WorkdirInUseError,
                       match=rf"workdir={re.escape(str(workdir))} is in use by another training run \(host "
                             rf"{re.escape(socket.gethostname())}, pid {holder.pid}, since \d{{4}}-"):
      trainer.train_and_evaluate(run_config(synthetic_dir), workdir)
    assert snapshot(workdir) == before
  finally:
    holder.communicate("")
  assert not workdir.exists()  # The holder took it empty and left it as it found it.


def test_total_steps_counts_epochs_unless_num_train_steps_is_set():
  config = run_config("", num_train_steps=-1)
  assert recipe.total_steps(config, 64) == 200 * 64
  config.num_train_steps = 7
  assert recipe.total_steps(config, 64) == 7


def test_a_signal_is_announced_by_the_loop_not_inside_its_handler(caplog):
  """A signal that lands while a log line is being written must not write over that line."""
  stop = trainer._StopRequest()  # pylint: disable=protected-access
  with caplog.at_level("WARNING"):
    stop(signal.SIGTERM, None)
    assert not caplog.records, "nothing written from the handler"
    assert stop.agreed(at_sync_point=False) and stop.agreed(at_sync_point=True)
  assert [r.getMessage() for r in caplog.records] == [
      "Got SIGTERM: stopping after the current step, with a checkpoint of it (send it again to stop at "
      "once, without saving)."]


def zero_term(inputs):
  """A generator loss term outside p2p_jax, named by import path."""
  return 0.0 * jnp.mean(inputs.fake)


def _programs(config):
  """The jaxprs of the initial state and of one step of ``Pix2Pix.from_config(config)``, as text."""
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=7)
  shapes = configuration.image_shapes(config)
  init = lambda key: trainer.train.create_train_state(key, pix2pix, shapes)
  state = jax.eval_shape(init, jax.random.key(0))
  batch = {name: jax.ShapeDtypeStruct((config.batch_size, *x.shape), x.dtype) for name, x in shapes.items()}
  step = jax.make_jaxpr(lambda s, b: trainer.train.train_step(s, b, pix2pix=pix2pix))(state, batch)
  return str(jax.make_jaxpr(init)(jax.random.key(0))), str(step)


@pytest.fixture(scope="module")
def tiny_programs():
  return _programs(tiny_config())


@pytest.mark.parametrize("key", trainer.KEYS_OUTSIDE_THE_PROGRAMS)
def test_keys_left_out_of_the_kept_executables_key_change_neither_program(tiny_programs, key):
  # What makes it safe to leave them out of cache.KeptExecutable's key.
  changed = tiny_config().copy_and_resolve_references()
  with changed.unlocked():
    changed[key] = 3 * (changed[key] if isinstance(changed[key], int) and changed[key] > 0 else 1) + 1
  assert _programs(changed) == tiny_programs


def test_the_program_texts_see_a_changed_setting(tiny_programs):
  # The comparison above can fail: a setting that is in the key changes the step's text.
  changed = tiny_config()
  changed.optim.lr = 3e-4
  assert _programs(changed)[1] != tiny_programs[1]


def test_the_kept_programs_description_names_each_convolution_s_formulation(monkeypatch):
  config = tiny_config()
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=7)
  batch = {name: jax.ShapeDtypeStruct((2, *x.shape), x.dtype) for name, x in configuration.image_shapes(config).items()}
  monkeypatch.setattr(trainer.tuning, "_known", lambda: {})
  static = trainer._program_description(config, pix2pix, 7, batch)
  site = next(s for s in trainer.tuning.step_sites(pix2pix, batch).values() if s.default != "xla")
  monkeypatch.setattr(trainer.tuning, "_known", lambda: {site.key: "xla"})
  measured = trainer._program_description(config, pix2pix, 7, batch)
  assert measured["formulations"] == {**static["formulations"], site.key: "xla"} != static["formulations"]


@pytest.mark.parametrize("case", ["builtin", "outside_import_path", "pix2pix_given", "not_asked"])
def test_executables_are_kept_only_when_asked_and_for_the_library_s_own_pieces(tmp_path, monkeypatch, case):
  decided = []
  monkeypatch.setattr(trainer, "_train", lambda *args: decided.append(args[-1]))
  config = tiny_config()
  config.batch_size = 4  # One example per fake device.
  if case == "outside_import_path":
    config.loss.terms.zero = {"fn": "tests.test_trainer:zero_term", "weight": 1.0}
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=10) if case == "pix2pix_given" else None
  trainer.train_and_evaluate(config, tmp_path / "run", pix2pix=pix2pix, keep_executables=case != "not_asked")
  assert decided == [case == "builtin"]
