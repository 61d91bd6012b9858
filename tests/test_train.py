"""The pure train_step: learning, determinism, jit/pmap equivalence, the LR schedule."""

import fractions
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import cache, parallel, recipe, runtime, train, tuning
from tests.conftest import STEPS_PER_EPOCH, tiny_config, tiny_pix2pix


def _batch(n=2, size=32, seed=0):
  source = jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)
  # A learnable mapping: the target is a fixed function of the source.
  return {"A": source, "B": jnp.flip(source, -1) * 0.5}


@functools.lru_cache
def _tiny_step(jit=True):
  step = functools.partial(train.train_step, pix2pix=tiny_pix2pix())
  return jax.jit(step) if jit else step


def _run(steps, batch, jit=True, seed=0, pix2pix=None):
  """``steps`` steps of ``pix2pix`` (the tiny_config one by default) on ``batch``."""
  state = train.create_train_state(jax.random.key(seed), pix2pix or tiny_pix2pix(), batch)
  step = _tiny_step(jit) if pix2pix is None else jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def _assert_trees_close(a, b, **tolerance):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


def _summation_order_pix2pix(axis_name=None, **model_overrides):
  """For comparing runs that only sum in another order: a learning rate of 1e-6.

  Adam divides each gradient element by its magnitude, so the rounding noise of
  an element near its epsilon moves that parameter by a sizeable fraction of
  the learning rate (1.4e-5 at 2e-4 in two steps here). The optimizer's moments
  are plain gradient averages and are compared too, so the steps still count.
  """
  config = tiny_config(**model_overrides)
  config.optim.lr = 1e-6
  return recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH, axis_name=axis_name)


def _assert_same_training(state, expected):
  for name in ("g_params", "d_params", "g_batch_stats", "d_batch_stats", "g_opt_state",
               "d_opt_state"):
    _assert_trees_close(getattr(state, name), getattr(expected, name), atol=1e-5)


def test_steps_on_one_batch_lower_the_l1_loss():
  state, history = _run(12, _batch())
  assert set(history[0]) == set(tiny_pix2pix().metric_names)
  assert int(state.step) == 12
  assert history[-1]["g_l1"] < 0.95 * history[0]["g_l1"]
  assert all(np.isfinite(v) for m in history for v in m.values())


def test_bfloat16_steps_learn_and_keep_the_state_float32():
  """Also the products' forms: a weight gradient whose transpose XLA folds into its bf16 product
  is one XLA:CPU cannot run (UNIMPLEMENTED at the first step)."""
  pix2pix = tiny_pix2pix(dtype="bfloat16")
  state, history = _run(12, _batch(), pix2pix=pix2pix)
  assert history[-1]["g_l1"] < 0.95 * history[0]["g_l1"]
  assert all(np.isfinite(v) for m in history for v in m.values())
  floats = [leaf for leaf in jax.tree_util.tree_leaves((state.g_params, state.g_opt_state))
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert {leaf.dtype for leaf in floats} == {jnp.dtype(jnp.float32)}


def test_same_seed_same_result_other_seed_other_result():
  first, _ = _run(2, _batch())
  again, _ = _run(2, _batch())
  other, _ = _run(2, _batch(), seed=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  assert not np.allclose(first.g_params["up_0"]["kernel"], other.g_params["up_0"]["kernel"])


def test_pmap_keeps_replicas_identical_and_matches_the_global_batch():
  """With synchronised batch norm and no dropout, 4 devices x 2 examples = one batch of 8."""
  assert jax.local_device_count() >= 4, "tests/conftest.py asks XLA for 4 CPU devices"
  synced = _summation_order_pix2pix(axis_name="batch", sync_batch_stats=True, use_dropout=False)
  pix2pix = _summation_order_pix2pix(use_dropout=False)
  batch = _batch(n=8)
  state = train.create_train_state(jax.random.key(0), pix2pix, batch)
  replicated = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (4, *x.shape)), state)
  pstep = jax.pmap(functools.partial(train.train_step, pix2pix=synced, axis_name="batch"),
                   axis_name="batch")
  sharded = jax.tree_util.tree_map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
  single = state
  step = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  for _ in range(2):
    replicated, pmetrics = pstep(replicated, sharded)
    single, metrics = step(single, batch)
  for leaf in jax.tree_util.tree_leaves(replicated):
    for replica in range(1, 4):
      np.testing.assert_array_equal(leaf[0], leaf[replica])
  _assert_same_training(jax.tree_util.tree_map(lambda x: x[0], replicated), single)
  _assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], pmetrics), metrics, rtol=1e-4)


@pytest.mark.parametrize("update", ["start_of_epoch", "end_of_epoch"])
@pytest.mark.parametrize("examples, batch_size", [(10, 1), (5, 2), (3, 4)])
def test_learning_rate_schedule_is_the_references_lambda_lr(update, examples, batch_size):
  """Each step runs at the rate torch's LambdaLR gives its epoch, with the reference's lambda_rule
  called where the reference's train.py calls it (now at the start of each epoch, before 2020 at its end).

  The epoch of a step is that of its batch's first example; the steps show every
  example num_epochs times, the last batch running into a further epoch by less than itself.
  """
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top  # torch: the parity extra
  config = tiny_config()
  config.optim.n_epochs, config.optim.n_epochs_decay, config.optim.lr_update = 2, 3, update
  expected = ref.epoch_learning_rates(config.optim.lr, 2, 3, update)
  factors = [1.0, 0.75, 0.5, 0.25, 0.0] if update == "start_of_epoch" else [1.0, 1.0, 0.75, 0.5, 0.25]
  assert expected == pytest.approx([config.optim.lr * f for f in factors])
  steps_per_epoch = fractions.Fraction(examples, batch_size)
  schedule = recipe.Pix2Pix.from_config(config, steps_per_epoch=steps_per_epoch).learning_rate
  num_steps = recipe.total_steps(config, steps_per_epoch)
  assert (num_steps - 1) * batch_size < 5 * examples <= num_steps * batch_size
  for step in range(num_steps):
    epoch = min(step * batch_size // examples, 4)
    assert float(schedule(step)) == pytest.approx(expected[epoch], rel=1e-6, abs=1e-12), (step, epoch)


def test_generate_modes():
  pix2pix = tiny_pix2pix(num_downs=6)
  batch = _batch(size=64)
  images = batch["A"]
  state = train.create_train_state(jax.random.key(0), pix2pix, batch)
  generate = functools.partial(train.generate, state, images, generator=pix2pix.generator)
  eval_out = generate(mode="eval")
  np.testing.assert_array_equal(eval_out, generate(mode="eval"))
  paper = lambda key: generate(key, mode="paper")
  assert paper(jax.random.key(0)).shape == images.shape
  assert not np.allclose(paper(jax.random.key(0)), paper(jax.random.key(1)))
  with pytest.raises(ValueError, match="needs an rng key"):
    generate(mode="paper")
  with pytest.raises(ValueError, match=r"mode must be one of \('eval', 'paper'\), got 'test'"):
    generate(mode="test")


def test_jit_over_a_device_mesh_matches_one_device():
  """The trainer's step over 4 devices is one device's on the global batch, dropout and all.

  Batch norm over the sharded batch uses global statistics although
  sync_batch_stats is off, metrics are global means, and the state is donated.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  pix2pix = _summation_order_pix2pix(num_downs=6)
  assert pix2pix.generator.axis_name is None and pix2pix.generator.use_dropout
  batch = _batch(n=4, size=64)
  state = train.create_train_state(jax.random.key(0), pix2pix, batch)
  mesh = parallel.make_mesh(jax.devices()[:4])
  sharded_step = parallel.make_train_step(pix2pix, mesh)
  step = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  # Replicating a copy: device 0's shard aliases its source (may_alias=False or not),
  # and donation deletes it.
  sharded_state = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), NamedSharding(mesh, P()))
  single_state = state
  for _ in range(2):
    previous = sharded_state
    sharded_state, sharded_metrics = sharded_step(
        sharded_state, jax.device_put(batch, NamedSharding(mesh, P(parallel.DATA_AXIS))))
    single_state, metrics = step(single_state, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(previous)), "not donated"
  assert sharded_state.g_params["up_0"]["kernel"].sharding.is_fully_replicated
  _assert_same_training(sharded_state, single_state)
  _assert_trees_close(sharded_metrics, metrics, rtol=1e-4)


def test_compiler_options_keep_the_result_and_drop_the_state_copies():
  """Donated and with COMPILER_OPTIONS, no parameter or moment is copied, and nothing else changes."""
  pix2pix = tiny_pix2pix()
  batch = _batch()
  state = train.create_train_state(jax.random.key(0), pix2pix, batch)
  step = functools.partial(train.train_step, pix2pix=pix2pix)
  plain = {"xla_cpu_copy_insertion_use_region_analysis": False}  # import p2p_jax set it in XLA_FLAGS
  compiled = {name: jax.jit(step, donate_argnums=0, compiler_options=options).lower(state, batch).compile()
              for name, options in (("plain", plain), ("tuned", runtime.COMPILER_OPTIONS))}
  state_copies = {name: re.findall(r"copy\(%state\S*(?:params|mu)", c.as_text()) for name, c in compiled.items()}
  assert state_copies["plain"], "without the options XLA:CPU copies the donated state"
  assert not state_copies["tuned"]
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled["tuned"](copy(state), batch),
                         compiled["plain"](copy(state), batch))


@pytest.mark.parametrize("sync", [False, True])
def test_sync_batch_stats_decides_whether_the_norms_see_the_device_axis(sync):
  """Under pmap the networks' batch norms reduce over the axis only when asked (see test_layers)."""
  pix2pix = recipe.Pix2Pix.from_config(tiny_config(sync_batch_stats=sync), steps_per_epoch=1, axis_name="batch")
  for network in (pix2pix.generator, pix2pix.discriminator):
    assert network.axis_name == ("batch" if sync else None)


def test_the_step_timer_compiles_the_step_its_layers_trace_now_and_runs_it(monkeypatch, tmp_path):
  """What tuning's whole-step check relies on: each compilation traces the networks anew."""
  monkeypatch.setenv(cache.ENV, str(tmp_path))
  pix2pix = tiny_pix2pix()
  image = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  batch = {"A": image, "B": image}
  mesh = parallel.make_mesh(jax.devices()[:1])
  compile_step = parallel.step_timer(pix2pix, batch, mesh)
  convolutions = []
  for fastest in ("xla", "matmul"):
    tuning.reset()
    monkeypatch.setenv(cache.ENV, str(tmp_path / fastest))
    tuning.tune(pix2pix, batch, min_flops=0,
                timer=lambda f, site, limit, **_: 1.0 if site.formulations.get(fastest) is f else 10.0)
    lowered = []
    monkeypatch.setattr(jax.stages.Lowered, "compile", _recording(jax.stages.Lowered.compile, lowered))
    run = compile_step({})
    convolutions.append(lowered[-1].as_text().count("stablehlo.convolution"))
    assert 0 < run() < 60 and 0 < run() < 60  # The state is donated and replaced at each call.
  tuning.reset()
  assert convolutions[0] > 0 == convolutions[1]


def test_the_train_step_compiles_with_the_options_tuning_chose(monkeypatch, tmp_path):
  """tune() may choose compiler options for the step (XLA:CPU's convolutions kept from YNNPACK):
  the library's step then compiles with them."""
  monkeypatch.setenv(cache.ENV, str(tmp_path))
  pix2pix = tiny_pix2pix()
  image = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  batch = {"A": image, "B": image}
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = jax.eval_shape(lambda key: train.create_train_state(key, pix2pix, batch), jax.random.key(0))
  in_ynnpack = lambda **options: parallel.make_train_step(pix2pix, mesh, **options).lower(
      state, batch).compile().as_text().count('"__ynn_fusion"')
  prefer_xla_without_ynnpack = lambda f, site, limit, compiler_options=None: (
      0.5 if compiler_options and site.formulations.get("xla") is f else 1.0)
  tuning.reset()
  tuning.tune(pix2pix, batch, min_flops=0, timer=prefer_xla_without_ynnpack,
              step_timer=lambda options: lambda: 0.1 if options else 0.2)
  ((_, options),) = tuning._variants().items()  # pylint: disable=protected-access
  assert tuning.compiler_options() == {**runtime.compiler_options(), **options}
  # The same layers' choices, with and without the options: fewer of XLA's operations go to YNNPACK.
  assert in_ynnpack() < in_ynnpack(compiler_options=runtime.compiler_options())
  tuning.reset()


def _recording(compile_method, lowered):
  def compile(self, *args, **kwargs):
    lowered.append(self)
    return compile_method(self, *args, **kwargs)
  return compile
