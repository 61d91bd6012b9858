"""The training loop, ``train_and_evaluate(config, workdir)``, and evaluation.

The loop is data parallel from the start: one ``jax.sharding.Mesh`` over all
devices of all processes with one axis, ``data``; the state is replicated, each
global batch is sharded along ``data`` and assembled from every process's own
slice. The same code runs on one CPU, on several devices and on many hosts, and
computes the same thing on all of them: batch norm uses the statistics of the
whole global batch and dropout draws one mask for it, as one device holding the
global batch would (see ``make_train_step``). A checkpoint therefore resumes on
any number of devices and hosts and continues the same run.

A run is resumable at every checkpoint and the resumed run is exact: the data
stream resumes at the checkpoint's step, and the dropout key is a function of
(seed, step). Step metrics stay on the devices until they are logged or a
checkpoint is due; then they are checked, so a non-finite loss is reported at
the first step that produced it and no non-finite state is ever saved.
"""

import contextlib
import functools
import signal
import threading
import time
from typing import Dict, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from p2p_jax import checkpoint, input_pipeline, metrics, summaries, train

DATA_AXIS = "data"
_POSITIVE_KEYS = ("log_every_steps", "checkpoint_every_steps", "sample_every_steps",
                  "keep_checkpoints", "num_sample_images")


class NonFiniteError(FloatingPointError):
  """A loss or the state became NaN or infinite; nothing after the last good checkpoint was saved."""


def make_mesh(devices=None) -> Mesh:
  """A one-axis (``data``) mesh over ``devices``, all devices of all processes by default.

  The devices go in process order, so process p's devices hold rows
  [p*B/P, (p+1)*B/P) of a global batch of B, the slice its input pipeline reads
  (``jax.devices()`` is ordered by device id, which on TPU pods need not follow
  the hosts).
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the devices (and so over the processes)."""
  if batch_size < 1 or batch_size % mesh.size:
    raise ValueError(
        f"config.batch_size={batch_size} must be a positive multiple of the number of devices, "
        f"{mesh.size} ({jax.process_count()} process(es) x {len(mesh.local_devices)} local "
        "device(s)): it is the global batch size, and every device takes an equal share.")


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """``train.train_step`` jitted over ``mesh``: state replicated and donated, batch split on ``data``.

  XLA partitions the one-device program, so batch norm normalises with the
  statistics of the global batch (synchronised, whatever
  ``config.model.sync_batch_stats`` says: that flag is for ``pmap``, where each
  device otherwise uses its own) and dropout draws one mask for the global
  batch. The result depends on the seed and the global batch size only, not on
  how many devices or hosts share the batch; per-device statistics would make a
  checkpoint resumed on another device count continue a different run.
  Metrics are means over the global batch.
  """
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(functools.partial(train.train_step, config=config),
                 in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                 donate_argnums=0, compiler_options=train.COMPILER_OPTIONS)


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checked copy of ``config`` with ``steps_per_epoch`` set from the training split."""
  config = config.copy_and_resolve_references()
  for key in _POSITIVE_KEYS:
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"config.{key} must be a positive int, got {config[key]!r}")
  if config.num_train_steps <= 0 and config.num_epochs < 1:
    raise ValueError(f"config.num_epochs={config.num_epochs} with config.num_train_steps="
                     f"{config.num_train_steps}: set one of them to a positive number.")
  input_pipeline.validate_config(config)
  config.steps_per_epoch = input_pipeline.steps_per_epoch(config)
  return config


def total_steps(config: ml_collections.ConfigDict) -> int:
  """``num_train_steps`` if positive, else ``num_epochs`` epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * config.steps_per_epoch


def make_translate_fn(config: ml_collections.ConfigDict, mode: str):
  """``(state, images, rng) -> generated``, each image translated on its own.

  In ``"paper"`` mode the generator normalises with the statistics of the
  image itself and draws its own dropout mask, exactly what the reference's
  test.py does with its batch size of 1; batching changes nothing.
  """
  if mode not in train.GENERATE_MODES:
    raise ValueError(f"mode must be one of {train.GENERATE_MODES}, got {mode!r}")

  def translate(state, images, rng):
    def one(image, key):
      return train.generate(state, image[None], key, mode, config=config)[0]
    return jax.vmap(one)(images, jax.random.split(rng, images.shape[0]))

  return translate


def to_host(tree):
  """Host copies of replicated arrays (also of arrays other processes hold a copy of)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _replicate(tree, sharding: NamedSharding):
  """Global arrays from host arrays that every process holds in full."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


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

  def __call__(self, signum, frame):
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
    self.signal_name = signal.Signals(signum).name
    logging.warning("Got %s: stopping after the current step, with a checkpoint of it (send it "
                    "again to stop at once, without saving).", self.signal_name)

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
    if jax.process_count() == 1:
      return self.signal_name is not None
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    return bool(np.max(flags))


class _PendingMetrics:
  """Step metrics left on the devices until the next log or checkpoint."""

  def __init__(self, writer, schedule):
    self.writer, self.schedule = writer, schedule
    self.pending = []
    self.last_time, self.last_step = time.perf_counter(), None

  def add(self, step: int, step_metrics) -> None:
    self.pending.append((step, step_metrics))

  def flush(self, step: int, where) -> Dict[str, float]:
    """Fetches, checks and writes the mean metrics since the last flush."""
    if not self.pending:
      return {}
    steps, values = zip(*self.pending)
    values = to_host(values)
    self.pending = []
    for s, v in zip(steps, values):
      bad = {name: float(x) for name, x in v.items() if not np.isfinite(x)}
      if bad:
        raise NonFiniteError(
            f"Step {s} gave a non-finite loss ({', '.join(f'{k}={x}' for k, x in bad.items())}); "
            f"stopped without saving anything after it. The checkpoints in {where} are kept; "
            "lower config.optim.lr or check the data, then run again to resume from the latest.")
    now = time.perf_counter()
    scalars = {name: float(np.mean([v[name] for v in values])) for name in values[0]}
    scalars["learning_rate"] = float(self.schedule(step - 1))
    if self.last_step is not None:
      scalars["steps_per_second"] = (step - self.last_step) / (now - self.last_time)
    self.last_time, self.last_step = now, step
    self.writer.write_scalars(step, scalars)
    return scalars


def _restore_or_init(manager, config, sharding, workdir) -> Tuple[train.TrainState, int]:
  latest = manager.latest_step()
  if latest is None:
    init = lambda key: train.create_train_state(key, config, (config.crop_size, config.crop_size, 3))
    state = jax.jit(init, out_shardings=sharding)(jax.random.key(config.seed))
    return state, 0
  saved = checkpoint.restore_config(manager, latest)
  checkpoint.check_compatible(saved, config, f"--workdir {workdir}")
  state, start_step = checkpoint.restore(manager, latest, config, sharding)
  logging.info("Resuming from the checkpoint of step %d in %s.", latest, manager.directory)
  return state, start_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> train.TrainState:
  """Trains (or resumes training) into ``workdir``; returns the final state.

  ``workdir`` receives ``checkpoints/``, TensorBoard event files and
  ``samples/`` (sample sheets and ``index.html``); it is a local path or a URL
  such as ``gs://bucket/run``, and every process of a multi-host run must see
  the same one. Stops early, after saving, on SIGTERM or SIGINT; raises
  NonFiniteError on a non-finite loss.
  """
  # From the start: a signal during set-up (data, restore, compilation) must
  # not kill the process, it only stops it before the first step.
  stop = _StopRequest()
  with stop.installed():
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config, workdir, stop: _StopRequest) -> train.TrainState:
  workdir = checkpoint.workdir_path(workdir)
  mesh = make_mesh()
  check_batch_size(config.batch_size, mesh)
  config = prepare_config(config)
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  state, start_step = _restore_or_init(manager, config, replicated, workdir)
  num_steps = total_steps(config)
  if start_step >= num_steps:
    logging.info("Nothing to do: the checkpoint is at step %d of %d.", start_step, num_steps)
    return state
  logging.info("Training steps %d to %d (%d per epoch) on %d device(s) in %d process(es); batch "
               "norm and dropout act on the global batch of %d.", start_step, num_steps,
               config.steps_per_epoch, mesh.size, jax.process_count(), config.batch_size)

  step_fn = make_train_step(config, mesh)
  sample_fn = jax.jit(make_translate_fn(config, "eval"), out_shardings=replicated)
  samples = next(input_pipeline.make_eval_dataset(
      config, batch_size=config.num_sample_images).as_numpy_iterator())
  sample_inputs = _replicate(samples["A"], replicated)
  batches = input_pipeline.make_train_dataset(config, start_step=start_step).as_numpy_iterator()

  writer = summaries.create_writer(workdir)
  log = _PendingMetrics(writer, train.learning_rate_schedule(config))
  checkpoints = checkpoint.checkpoint_dir(workdir)
  is_main = jax.process_index() == 0

  def write_samples(state, step):
    generated = to_host(sample_fn(state, sample_inputs, jax.random.key(0)))
    sheet = summaries.sample_sheet(samples["A"], generated, samples["B"])
    if is_main:
      summaries.write_samples(workdir / summaries.SAMPLES_DIR, step, sheet)
    writer.write_images(step, {"samples": sheet[None]})

  def save(state, step):
    log.flush(step, checkpoints)
    if not to_host(_all_finite(state)):
      raise NonFiniteError(f"The state after step {step} is not finite; it was not saved. The "
                           f"checkpoints in {checkpoints} are kept; lower config.optim.lr.")
    checkpoint.save(manager, state, step, config)

  if stop.agreed(at_sync_point=True):
    logging.warning("Stopped by %s before step %d; nothing new to save in %s.", stop.signal_name,
                    start_step + 1, checkpoints)
    return state
  progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", disable=not is_main,
                       dynamic_ncols=True)
  try:
    for step in range(start_step + 1, num_steps + 1):
      batch = jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(batch_sharding, x), next(batches))
      state, step_metrics = step_fn(state, batch)
      log.add(step, step_metrics)
      progress.update()
      stopping = stop.agreed(at_sync_point=step % config.log_every_steps == 0)
      if step % config.log_every_steps == 0:
        scalars = log.flush(step, checkpoints)
        progress.set_postfix({k: f"{scalars[k]:.3g}" for k in ("d_loss", "g_gan", "g_l1")})
      if step % config.sample_every_steps == 0 or step == num_steps:
        write_samples(state, step)
      if step % config.checkpoint_every_steps == 0 or step == num_steps or stopping:
        save(state, step)
      if stopping:
        logging.warning("Stopped by %s after step %d; saved a checkpoint in %s.",
                        stop.signal_name, step, checkpoints)
        break
  finally:
    progress.close()
    manager.wait_until_finished()
    writer.flush()
  return state


def evaluate(state: train.TrainState, config: ml_collections.ConfigDict, *,
             split: Optional[str] = None, mode: str = "eval", batch_size: Optional[int] = None,
             seed: int = 0) -> Tuple[Dict[str, float], np.ndarray]:
  """Mean L1, PSNR and SSIM over a split, and a sample sheet of its first images.

  Single-process; ``seed`` draws the dropout masks in ``"paper"`` mode.
  """
  translate = jax.jit(make_translate_fn(config, mode))
  dataset = input_pipeline.make_eval_dataset(config, batch_size=batch_size, split=split)
  totals, count, sheet_parts = {}, 0, []
  for index, batch in enumerate(dataset.as_numpy_iterator()):
    generated = translate(state, batch["A"], jax.random.fold_in(jax.random.key(seed), index))
    for name, values in jax.device_get(metrics.image_metrics(generated, batch["B"])).items():
      totals[name] = totals.get(name, 0.0) + float(np.sum(values))
    count += len(batch["A"])
    if sum(len(p[0]) for p in sheet_parts) < config.num_sample_images:
      sheet_parts.append((batch["A"], np.asarray(generated), batch["B"]))
  if not count:
    raise ValueError(f"The eval split {split or config.eval_split!r} of {config.dataset!r} is empty.")
  columns = [np.concatenate(c)[:config.num_sample_images] for c in zip(*sheet_parts)]
  means = {name: total / count for name, total in totals.items()}
  means["num_images"] = count
  return means, summaries.sample_sheet(*columns)
