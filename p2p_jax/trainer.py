"""The training loop, ``train_and_evaluate(config, workdir, pix2pix=None)``.

The loop is data parallel from the start: one ``jax.sharding.Mesh`` over all
devices of all processes with one axis, ``data``; the state is replicated, each
global batch is sharded along ``data`` and assembled from every process's own
slice. The same code runs on one CPU, on several devices and on many hosts, and
computes the same thing on all of them: batch norm uses the statistics of the
whole global batch and dropout draws one mask for it, as one device holding the
global batch would (see ``parallel.make_train_step``). A checkpoint therefore resumes on
any number of devices and hosts and continues the same run.

The networks, optimisers and losses are those ``config`` names, or a
``recipe.Pix2Pix`` given as ``pix2pix``: everything here (resumption, the
non-finite check, sample sheets, TensorBoard) works the same for both.

A run is resumable at every checkpoint and the resumed run is exact: the data
stream resumes at the checkpoint's step, and the dropout key is a function of
(seed, step). Step metrics stay on the devices until they are logged or a
checkpoint is due; then they are checked, so a non-finite loss is reported at
the first step that produced it and no non-finite state is ever saved.
"""

import contextlib
import signal
import threading
import time
from typing import Dict, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from p2p_jax import (cache, checkpoint, configuration, inference, input_pipeline, locking, parallel, perceptual,
                     progress, recipe, runtime, summaries, train, tuning)

# Config keys that reach neither the initial state nor the step (how often to log, save and sample,
# and how long to train): a run continued for more steps reuses the kept executables.
# tests/test_trainer.py checks that changing each leaves both programs as they were.
KEYS_OUTSIDE_THE_PROGRAMS = ("num_train_steps", "num_epochs", "log_every_steps", "checkpoint_every_steps",
                             "sample_every_steps", "eval_every_steps", "keep_checkpoints", "num_sample_images")


class NonFiniteError(FloatingPointError):
  """A loss or the state became NaN or infinite; nothing after the last good checkpoint was saved."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


class _StopRequest:
  """SIGTERM / SIGINT handler: asks the loop to save after the current step, then return.

  A second signal stops at once (KeyboardInterrupt); checkpoints already written stay.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._announced = False

  def __call__(self, signum, frame):
    # No output here: a signal that lands while a log line is being written
    # would write over it. The loop says it, in agreed().
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
    self.signal_name = signal.Signals(signum).name

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self  # Python delivers signals to the main thread only.
      return
    previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def agreed(self, at_sync_point: bool) -> bool:
    """Whether to stop now; with several processes all decide together at sync points."""
    if self.signal_name is not None and not self._announced:
      self._announced = True
      logging.warning("Got %s: stopping after the current step, with a checkpoint of it (send it "
                      "again to stop at once, without saving).", self.signal_name)
    if jax.process_count() == 1:
      return self.signal_name is not None
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    return bool(np.max(flags))


class _PendingMetrics:
  """Step metrics left on the devices until the next log or checkpoint."""

  def __init__(self, writer, terminal: progress.Progress, learning_rate):
    self.writer, self.terminal, self.learning_rate = writer, terminal, learning_rate
    self.pending = []

  def add(self, step: int, step_metrics) -> None:
    self.pending.append((step, step_metrics))

  def flush(self, step: int, where) -> Dict[str, float]:
    """Fetches, checks and writes the mean metrics since the last flush."""
    if not self.pending:
      return {}
    steps, values = zip(*self.pending)
    values = parallel.to_host(values)
    self.pending = []
    for s, v in zip(steps, values):
      bad = {name: float(x) for name, x in v.items() if not np.isfinite(x)}
      if bad:
        raise NonFiniteError(
            f"Step {s} gave a non-finite loss ({', '.join(f'{k}={x}' for k, x in bad.items())}); "
            f"stopped without saving anything after it. The checkpoints in {where} are kept; "
            "lower config.optim.lr or check the data, then run again to resume from the latest.")
    scalars = {name: float(np.mean([v[name] for v in values])) for name in values[0]}
    if self.learning_rate is not None:
      scalars["learning_rate"] = float(self.learning_rate(step - 1))
    rate = self.terminal.log(step, scalars)
    if rate is not None:
      scalars["steps_per_second"] = rate
    self.writer.write_scalars(step, scalars)
    return scalars


def _program_description(config: ml_collections.ConfigDict, pix2pix: recipe.Pix2Pix, steps_per_epoch,
                         batch) -> Dict:
  """What the init and step programs of ``pix2pix = Pix2Pix.from_config(config)`` compute beyond the sources."""
  return {"config": {key: value for key, value in configuration.flatten(config).items()
                     if key not in KEYS_OUTSIDE_THE_PROGRAMS},
          "steps_per_epoch": repr(steps_per_epoch), "formulations": tuning.step_choices(pix2pix, batch),
          "compiler_options": tuning.compiler_options()}


def _kept(jitted, description: Optional[Dict], program: str, mesh):
  """``jitted`` as a ``cache.KeptExecutable`` when there is a description to key it by."""
  if description is None:
    return jitted
  return cache.KeptExecutable(jitted, {**description, "program": program}, mesh.devices.flat)


def _restore_or_init(manager, config, pix2pix, mesh, workdir, description) -> Tuple[train.TrainState, int]:
  """The newest intact checkpoint's state and step, or a fresh state at step 0.

  Damaged checkpoints newer than the intact one are set aside (moved to
  ``checkpoints_damaged/``, not deleted) with a warning; if none is intact,
  nothing is moved and the error says so.
  """
  shapes, sharding = configuration.image_shapes(config), NamedSharding(mesh, P())
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    init = jax.jit(lambda key: train.create_train_state(key, pix2pix, shapes), out_shardings=sharding)
    return _kept(init, description, "init", mesh)(jax.random.key(config.seed)), 0
  damaged = []
  for step in steps:
    try:
      saved = checkpoint.restore_config(manager, step)
      configuration.check_compatible(saved, config, f"workdir={workdir}")
      state, start_step = checkpoint.restore(manager, step, pix2pix, shapes, sharding)
    except checkpoint.DamagedCheckpointError as error:
      logging.error("%s", error)
      damaged.append(error)
      continue
    for error in damaged:
      aside = checkpoint.set_aside(manager, error.step)
      logging.warning("RESUMING FROM AN OLDER CHECKPOINT: checkpoint %d is damaged (%s). It was moved "
                      "to %s; training resumes from step %d, the newest intact checkpoint.",
                      error.step, error.what, aside, step)
    logging.info("Resuming from the checkpoint of step %d in %s.", step, manager.directory)
    return state, start_step
  raise checkpoint.DamagedCheckpointError(
      damaged[0].step, manager.directory,
      f"{damaged[0].what} No checkpoint of this run is intact (steps {steps} checked); they were left "
      "in place. Restore the workdir from a backup, or train into a new workdir.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       pix2pix: Optional[recipe.Pix2Pix] = None, keep_executables: bool = False) -> train.TrainState:
  """Trains (or resumes training) into ``workdir``; returns the final state.

  The networks, optimisers and losses are ``pix2pix`` if given, else those
  ``config`` names (``Pix2Pix.from_config``). ``workdir`` receives
  ``checkpoints/``, TensorBoard event files and ``samples/`` (sample sheets
  and ``index.html``); it is a local path or a URL such as
  ``gs://bucket/run``, and every process of a multi-host run must see the
  same one. Stops early, after saving, on SIGTERM or SIGINT; raises
  NonFiniteError on a non-finite loss, and a ValueError naming the config key
  for a setting it cannot run, before anything is written.

  ``keep_executables`` keeps the compiled initialisation and step between
  processes (``cache.KeptExecutable``), so that the next start of the same
  run, or of one that differs only in ``KEYS_OUTSIDE_THE_PROGRAMS``, skips
  tracing them: for the pieces the config names, when it names no code
  outside p2p_jax by import path, and when nothing patched the library in
  this process (``experiments.train`` turns it on).
  """
  # From the start: a signal during set-up (data, restore, compilation) must
  # not kill the process, it only stops it before the first step.
  stop = _StopRequest()
  with stop.installed():
    return _train_and_evaluate(config, workdir, pix2pix, stop, keep_executables)


def _train_and_evaluate(config, workdir, pix2pix, stop: _StopRequest, keep_executables: bool) -> train.TrainState:
  workdir = checkpoint.workdir_path(workdir)
  mesh = parallel.make_mesh()
  configuration.check(config, num_devices=mesh.size, num_processes=jax.process_count(), pix2pix=pix2pix)
  keep_executables &= pix2pix is None and not configuration.outside_import_paths(config)
  with locking.hold(workdir):
    return _train(config, workdir, pix2pix, stop, mesh, keep_executables)


def _train(config, workdir, pix2pix, stop: _StopRequest, mesh, keep_executables: bool) -> train.TrainState:
  set_up_began = time.perf_counter()
  # The eval split first: it is usually the smaller, and a bad one is found before the long scan.
  eval_source = input_pipeline.pair_source(config, config.eval_split, named_by="config.eval_split")
  train_source = input_pipeline.pair_source(config, config.train_split, named_by="config.train_split")
  steps_per_epoch = input_pipeline.steps_per_epoch(config, train_source)
  pix2pix = pix2pix or recipe.Pix2Pix.from_config(config, steps_per_epoch=steps_per_epoch)
  batch_shapes = {name: jax.ShapeDtypeStruct((config.batch_size, *example.shape), example.dtype)
                  for name, example in configuration.image_shapes(config).items()}
  if runtime.enabled():  # Before anything traces the networks: "auto" layers then run what was measured.
    tuning.tune(pix2pix, batch_shapes, step_timer=parallel.step_timer(pix2pix, batch_shapes, mesh))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.DATA_AXIS))
  description = (_program_description(config, pix2pix, steps_per_epoch, batch_shapes) if keep_executables
                 else None)
  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  state, start_step = _restore_or_init(manager, config, pix2pix, mesh, workdir, description)
  num_steps = recipe.total_steps(config, steps_per_epoch)
  if start_step >= num_steps:
    logging.info("Nothing to do: the checkpoint is at step %d of %d.", start_step, num_steps)
    return state
  logging.info("Training steps %d to %d (%g per epoch) on %d device(s) in %d process(es); batch "
               "norm and dropout act on the global batch of %d.", start_step, num_steps,
               float(steps_per_epoch), mesh.size, jax.process_count(), config.batch_size)

  step_fn = _kept(parallel.make_train_step(pix2pix, mesh), description, "train_step", mesh)
  sample_fn = jax.jit(inference.make_translate_fn(pix2pix.generator, "eval"), out_shardings=replicated)
  samples = next(input_pipeline.make_eval_dataset(
      config, batch_size=config.num_sample_images, source=eval_source).as_numpy_iterator())
  batches = input_pipeline.make_train_dataset(config, start_step=start_step,
                                              source=train_source).as_numpy_iterator()

  is_main = jax.process_index() == 0
  writer = summaries.create_writer(workdir)
  checkpoints = checkpoint.checkpoint_dir(workdir)

  def write_samples(state, step):
    network = lambda images, indices: parallel.to_host(sample_fn(
        state, parallel.replicate(images, replicated), jax.random.key(0), parallel.replicate(indices, replicated)))
    generated = inference.generate(network, samples["A"], np.arange(len(samples["A"])),
                                   multiple=inference.size_multiple(pix2pix.generator))
    sheet = summaries.sample_sheet(samples["A"], inference.viewable(config, samples["A"], generated),
                                   inference.viewable(config, samples["A"], samples["B"]))
    if is_main:
      summaries.write_samples(workdir / summaries.SAMPLES_DIR, step, sheet)
    writer.write_images(step, {"samples": sheet[None]})

  scorer = None
  if config.eval_every_steps:
    weights = perceptual.load_weights()
    perceptual.warn_missing(weights)
    scorer = perceptual.Scorer(weights)

  def evaluate(state, step):
    nonlocal scorer
    means, _ = inference.evaluate(state, pix2pix.generator, config, scorer=scorer, source=eval_source)
    scorer = scorer.fresh()  # The eval split's real features are computed once per run.
    scalars = {f"eval/{name}": value for name, value in means.items() if name != "num_images"}
    writer.write_scalars(step, scalars)
    logging.info("Evaluated step %d on %d images of %r: %s", step, means["num_images"], config.eval_split,
                 ", ".join(f"{name}={value:.4g}" for name, value in sorted(scalars.items())))

  def save(state, step, log, previous):
    log.flush(step, checkpoints)
    if previous is not None:  # Its write must have succeeded (the new save would wait for it anyway).
      checkpoint.check_saved(manager, previous, wait=True)
    if not parallel.to_host(_all_finite(state)):
      raise NonFiniteError(f"The state after step {step} is not finite; it was not saved. The "
                           f"checkpoints in {checkpoints} are kept; lower config.optim.lr.")
    checkpoint.save(manager, state, step, config, pix2pix)
    if jax.default_backend() == "cpu":
      # In the background the write shares the step's cores, and its copies of the state take the heap
      # the step's buffers had: waiting costs about a second a save, and 0.4-0.7 GB less (BENCHMARKS.md).
      checkpoint.check_saved(manager, step, wait=True)
    return step

  if stop.agreed(at_sync_point=True):
    logging.warning("Stopped by %s before step %d; nothing new to save in %s.", stop.signal_name,
                    start_step + 1, checkpoints)
    return state
  saved = None  # The step of the last save begun; off CPU its write finishes in the background.
  # Heap freed since the last trim (runtime.release_free_memory): by compilation and
  # initialisation, trimmed after the first step, and by each save, trimmed once it is written.
  untrimmed = True
  try:
    with progress.Progress(num_steps, start_step, enabled=is_main) as terminal:
      log = _PendingMetrics(writer, terminal, pix2pix.learning_rate)
      for step in range(start_step + 1, num_steps + 1):
        if saved is not None:  # A failed save stops the run at the next step, not at the end.
          checkpoint.check_saved(manager, saved)
        if untrimmed and step > start_step + 1 and not manager.is_saving_in_progress():
          runtime.release_free_memory()
          untrimmed = False
        batch = jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x), next(batches))
        state, step_metrics = step_fn(state, batch)
        if step == start_step + 1:
          jax.block_until_ready(step_metrics)
          logging.info("First step done, %.1f s after set-up began (data, state, compilation or "
                       "the compilation cache).", time.perf_counter() - set_up_began)
        log.add(step, step_metrics)
        terminal.update()
        stopping = stop.agreed(at_sync_point=step % config.log_every_steps == 0)
        if step % config.log_every_steps == 0:
          log.flush(step, checkpoints)
        if step % config.sample_every_steps == 0 or step == num_steps:
          write_samples(state, step)
        if config.eval_every_steps and (step % config.eval_every_steps == 0 or step == num_steps):
          evaluate(state, step)
        if step % config.checkpoint_every_steps == 0 or step == num_steps or stopping:
          saved = save(state, step, log, saved)
          untrimmed = True
        if stopping:
          logging.warning("Stopped by %s after step %d; saved a checkpoint in %s.",
                          stop.signal_name, step, checkpoints)
          break
    if saved is not None:
      checkpoint.check_saved(manager, saved, wait=True)
  except OSError:  # A full disk fails whatever writes next; the save it broke is what to report.
    if saved is not None:
      checkpoint.check_saved(manager, saved, wait=True)
    raise
  finally:
    with contextlib.suppress(Exception):  # Already reported by check_saved, or the error under way is the news.
      manager.wait_until_finished()
    writer.flush()
  return state
