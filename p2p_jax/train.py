"""Training state and the pure pix2pix training step.

``train_step(state, batch, config=...)`` does what one iteration of the
reference's ``Pix2PixModel.optimize_parameters`` does: one discriminator update
on the real pair and the (detached) fake pair, then one generator update on the
adversarial loss plus ``lambda_l1`` times L1. The generator's forward pass runs
once and its VJP is reused for the generator's gradient.
"""

from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from p2p_jax import losses, models

METRIC_NAMES = ("d_real", "d_fake", "d_loss", "g_gan", "g_l1", "g_loss")
# Compiler options for jitting train_step with the state donated. Without them
# XLA:CPU copies every parameter and first Adam moment at the start of each step
# (0.4 GB at 256 px), as the in-place updates cannot be proven safe otherwise;
# its region analysis proves them safe. Other backends ignore the option.
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
GENERATE_MODES = ("eval", "paper")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  g_params: Any
  g_batch_stats: Any
  d_params: Any
  d_batch_stats: Any
  g_opt_state: Any
  d_opt_state: Any
  rng: jax.Array


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The reference's 'linear' policy, in steps.

  The rate is ``optim.lr`` for ``optim.n_epochs`` epochs, then falls linearly over
  ``optim.n_epochs_decay`` epochs, stepping once per epoch exactly as the
  reference's ``LambdaLR`` does: ``1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)``.
  """
  steps_per_epoch = config.steps_per_epoch
  if steps_per_epoch is None or steps_per_epoch < 1:
    raise ValueError(
        f"config.steps_per_epoch must be a positive int, got {steps_per_epoch!r} "
        "(experiments.train sets it from the size of the training split).")
  optim = config.optim

  def schedule(step):
    epoch = step // steps_per_epoch
    factor = 1.0 - jnp.maximum(0, epoch + 1 - optim.n_epochs) / (optim.n_epochs_decay + 1)
    return optim.lr * jnp.maximum(factor, 0.0)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(2e-4, 0.5, 0.999) with the linear-decay schedule; one each for G and D."""
  return optax.adam(learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2)


def _networks(config: ml_collections.ConfigDict, axis_name: Optional[str] = None):
  bn_axis = axis_name if config.model.sync_batch_stats else None
  return (models.make_generator(config.model, bn_axis),
          models.make_discriminator(config.model, bn_axis))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       image_shape: Tuple[int, int, int]) -> TrainState:
  """Initialises both networks for ``image_shape`` = (height, width, channels)."""
  models.check_image_size(config.model, image_shape[0])
  tx = make_optimizer(config)
  generator, discriminator = _networks(config)
  g_key, d_key, train_key = jax.random.split(rng, 3)
  image = jnp.zeros((1, *image_shape), jnp.float32)
  g_vars = jax.jit(lambda: generator.init({"params": g_key}, image, train=False))()
  d_vars = jax.jit(lambda: discriminator.init({"params": d_key}, image, image, train=False))()
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      g_params=g_vars["params"], g_batch_stats=g_vars.get("batch_stats", {}),
      d_params=d_vars["params"], d_batch_stats=d_vars.get("batch_stats", {}),
      g_opt_state=tx.init(g_vars["params"]), d_opt_state=tx.init(d_vars["params"]),
      rng=_raw_key(train_key))


def _raw_key(key: jax.Array) -> jax.Array:
  # Plain uint32 key data checkpoints, compares and replicates like any array.
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _dropout_key(state: TrainState, axis_name: Optional[str]) -> jax.Array:
  # A function of (seed, step, device position) only, so a resumed run and a
  # run on another host layout draw the same masks.
  key = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, lax.axis_index(axis_name))
  return key


def train_step(state: TrainState, batch, *, config: ml_collections.ConfigDict,
               axis_name: Optional[str] = None):
  """One D update then one G update. Pure: ``jax.jit`` and ``jax.pmap`` it.

  Jit it with the state donated and ``compiler_options=COMPILER_OPTIONS``
  (``experiments.train`` does).

  ``batch`` is ``{"A": source, "B": target}``, NHWC float32 in [-1, 1]. With
  ``axis_name`` (under ``pmap``), gradients, metrics and running batch
  statistics are averaged over that axis, each device draws its own dropout
  masks, and batch norm uses each device's own statistics unless
  ``config.model.sync_batch_stats``, which normalises with those of the whole
  global batch. Jitted over a mesh without ``axis_name``
  (``trainer.make_train_step``) the step is that of one device holding the
  global batch: normalisation is always over the global batch.
  Returns the new state and the scalar metrics ``METRIC_NAMES``.
  """
  generator, discriminator = _networks(config, axis_name)
  tx = make_optimizer(config)
  gan_mode, lambda_l1 = config.loss.gan_mode, config.loss.lambda_l1
  source, target = batch["A"], batch["B"]
  mean = (lambda t: lax.pmean(t, axis_name)) if axis_name is not None else (lambda t: t)

  def generate_fake(g_params):
    fake, updated = generator.apply(
        {"params": g_params, "batch_stats": state.g_batch_stats}, source, train=True,
        rngs={"dropout": _dropout_key(state, axis_name)}, mutable=["batch_stats"])
    return fake, updated.get("batch_stats", {})

  fake, generator_vjp, g_batch_stats = jax.vjp(generate_fake, state.g_params, has_aux=True)

  def apply_discriminator(d_params, d_batch_stats, image):
    logits, updated = discriminator.apply(
        {"params": d_params, "batch_stats": d_batch_stats}, source, image, train=True,
        mutable=["batch_stats"])
    return logits, updated.get("batch_stats", {})

  def d_objective(d_params):
    # Fake first, then real: the reference's order, which its running stats see.
    fake_logits, d_batch_stats = apply_discriminator(d_params, state.d_batch_stats,
                                                     lax.stop_gradient(fake))
    real_logits, d_batch_stats = apply_discriminator(d_params, d_batch_stats, target)
    d_loss, d_real, d_fake = losses.discriminator_loss(real_logits, fake_logits, gan_mode)
    return d_loss, (d_batch_stats, d_real, d_fake)

  (d_loss, (d_batch_stats, d_real, d_fake)), d_grads = jax.value_and_grad(
      d_objective, has_aux=True)(state.d_params)
  d_updates, d_opt_state = tx.update(mean(d_grads), state.d_opt_state, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  def g_objective(fake):
    fake_logits, new_d_batch_stats = apply_discriminator(d_params, d_batch_stats, fake)
    g_gan = losses.generator_gan_loss(fake_logits, gan_mode)
    g_l1 = losses.l1_loss(fake, target)
    return g_gan + lambda_l1 * g_l1, (new_d_batch_stats, g_gan, g_l1)

  (g_loss, (d_batch_stats, g_gan, g_l1)), fake_grad = jax.value_and_grad(
      g_objective, has_aux=True)(fake)
  (g_grads,) = generator_vjp(fake_grad)
  g_updates, g_opt_state = tx.update(mean(g_grads), state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)

  new_state = state.replace(
      step=state.step + 1, g_params=g_params, g_batch_stats=mean(g_batch_stats),
      d_params=d_params, d_batch_stats=mean(d_batch_stats),
      g_opt_state=g_opt_state, d_opt_state=d_opt_state)
  metrics = dict(d_real=d_real, d_fake=d_fake, d_loss=d_loss, g_gan=g_gan, g_l1=g_l1, g_loss=g_loss)
  return new_state, mean(metrics)


def generate(state: TrainState, images, rng: Optional[jax.Array] = None, mode: str = "eval", *,
             config: ml_collections.ConfigDict):
  """Translates ``images`` (NHWC in [-1, 1]) with the generator.

  ``mode="eval"``: running batch statistics, no dropout (the usual inference).
  ``mode="paper"``: as the paper does at test time (section 3.3), dropout kept
  (drawn from ``rng``) and the statistics of this batch; running stats untouched.
  """
  generator = models.make_generator(config.model)
  variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}
  if mode == "eval":
    return generator.apply(variables, images, train=False)
  if mode == "paper":
    if rng is None:
      raise ValueError("generate(mode='paper') draws dropout masks and needs an rng key")
    return generator.apply(variables, images, train=True, rngs={"dropout": rng})
  raise ValueError(f"mode must be one of {GENERATE_MODES}, got {mode!r}")


def train_steps(state: TrainState, batches, *, config: ml_collections.ConfigDict,
                axis_name: Optional[str] = None):
  """``train_step`` over the leading axis of ``batches`` in one call (``lax.scan``).

  Several steps per dispatch hide the host's launch overhead on accelerators.
  Returns the final state and the metrics of every step, stacked.
  """
  step = lambda state, batch: train_step(state, batch, config=config, axis_name=axis_name)
  return lax.scan(step, state, batches)
