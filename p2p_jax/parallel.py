"""Data parallelism over a device mesh: the mesh, the jitted train step over it, host copies.

One ``jax.sharding.Mesh`` over all devices of all processes with one axis,
``data``: the state is replicated and each global batch is split along
``data``. Imports no TensorFlow, so ``experiments.benchmark`` measures the step
alone.
"""

import functools
import time
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from p2p_jax import recipe, runtime, train, tuning

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A one-axis (``data``) mesh over ``devices``, all devices of all processes by default.

  The devices go in process order, so process p's devices hold rows
  [p*B/P, (p+1)*B/P) of a global batch of B, the slice its input pipeline reads
  (``jax.devices()`` is ordered by device id, which on TPU pods need not follow
  the hosts).
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,))


def make_train_step(pix2pix: recipe.Pix2Pix, mesh: Mesh, *, steps_per_call: int = 1,
                    compiler_options: Optional[dict] = None):
  """``train.train_step`` jitted over ``mesh``: state replicated and donated, batch split on ``data``.

  XLA partitions the one-device program, so batch norm normalises with the
  statistics of the global batch (synchronised, whatever
  ``config.model.sync_batch_stats`` says: that flag is for ``pmap``, where each
  device otherwise uses its own) and dropout draws one mask for the global
  batch. The result depends on the seed and the global batch size only, not on
  how many devices or hosts share the batch; per-device statistics would make a
  checkpoint resumed on another device count continue a different run.
  Metrics are means over the global batch. ``steps_per_call > 1`` runs that
  many steps per call (``train.train_steps``; batches get a leading axis of
  that size). ``compiler_options`` default to ``tuning.compiler_options()``.
  """
  replicated = NamedSharding(mesh, P())
  if steps_per_call == 1:
    step, data = train.train_step, NamedSharding(mesh, P(DATA_AXIS))
  else:
    step, data = train.train_steps, NamedSharding(mesh, P(None, DATA_AXIS))
  options = tuning.compiler_options() if compiler_options is None else compiler_options
  return jax.jit(functools.partial(step, pix2pix=pix2pix), in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=0, compiler_options=options or None)


def step_timer(pix2pix: recipe.Pix2Pix, batch: Mapping[str, jax.ShapeDtypeStruct],
               mesh: Mesh) -> Callable[[dict], Callable[[], float]]:
  """For ``tuning.tune``'s whole-step check: a function that compiles a train step as the networks
  trace at that moment (global batches shaped like ``batch``), with ``runtime.compiler_options()``
  and the options it is given, and returns a call that runs it once on random images and gives its
  seconds. The steps share one state, made on first use."""
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  shared = {}

  def compile_step(options: dict) -> Callable[[], float]:
    if not shared:
      shared["state"] = jax.jit(lambda key: train.create_train_state(key, pix2pix, batch),
                                out_shardings=replicated)(jax.random.key(0))
      keys = dict(zip("AB", jax.random.split(jax.random.key(1))))
      shared["batch"] = {name: jax.device_put(jax.random.uniform(keys[name], batch[name].shape, jnp.float32, -1, 1),
                                              data) for name in "AB"}
    step = make_train_step(pix2pix, mesh, compiler_options={**runtime.compiler_options(), **options})
    compiled = step.lower(shared["state"], shared["batch"]).compile()

    def run() -> float:
      start = time.perf_counter()
      shared["state"], metrics = compiled(shared["state"], shared["batch"])
      jax.block_until_ready(metrics)
      return time.perf_counter() - start
    return run
  return compile_step


def to_host(tree):
  """Host copies of replicated arrays (also of arrays other processes hold a copy of)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def replicate(tree, sharding: NamedSharding):
  """Global arrays from host arrays that every process holds in full."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)
