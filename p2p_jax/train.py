"""Training state and the pure pix2pix training step.

``train_step(state, batch, pix2pix=...)`` does what one iteration of the
reference's ``Pix2PixModel.optimize_parameters`` does: one discriminator update
on the real pair and the (detached) fake pair, then one generator update on the
adversarial loss plus its other terms (the reference's: ``lambda_l1`` times L1).
The generator's forward pass runs once and its VJP is reused for the
generator's gradient. ``pix2pix`` (``recipe.Pix2Pix``) holds the networks, the
optimisers and the losses, so any Flax modules and optax transformations train
the same way.
"""

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from jax import lax
import optax

from p2p_jax import losses, recipe
from p2p_jax.recipe import Pix2Pix

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


class NetworkError(ValueError):
  """A generator or discriminator (``role``) cannot take the inputs the step gives it."""

  def __init__(self, role: str, message: str):
    super().__init__(message)
    self.role = role


def _init(role: str, module, rngs, *inputs):
  """``(output shape, module.init(rngs, *inputs, train=False))``; a NetworkError if the module refuses them.

  The output's shape comes from shapes alone: no forward pass is computed.
  """
  call = ", ".join(["variables", *(f"<{'x'.join(map(str, x.shape))} image>" for x in inputs), "train=False"])
  try:
    output, _ = jax.eval_shape(functools.partial(module.init_with_output, train=False), rngs, *inputs)
  except Exception as error:  # pylint: disable=broad-except  # Whatever the user's module raises.
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise NetworkError(role, f"the {role} {recipe.qualified_name(module)} fails on {role}.apply({call}): "
                       f"{type(error).__name__}: {first_line}") from error
  return output, jax.jit(functools.partial(module.init, train=False))(rngs, *inputs)


def _example(array) -> jax.Array:
  return jnp.zeros((1, *array.shape[-3:]), jnp.float32)


def create_train_state(rng: jax.Array, pix2pix: Pix2Pix, batch) -> TrainState:
  """Initialises both networks and optimisers for batches shaped like ``batch``.

  ``batch`` is ``{"A": source, "B": target}`` (NHWC arrays, or anything with a
  ``shape``, such as ``jax.ShapeDtypeStruct``); only each image's
  (height, width, channels) matters. A NetworkError says which network cannot
  take them or does not return an image of the target's shape.
  """
  source, target = _example(batch["A"]), _example(batch["B"])
  g_key, d_key, train_key = jax.random.split(rng, 3)
  fake, g_vars = _init("generator", pix2pix.generator, {"params": g_key, "dropout": g_key}, source)
  if getattr(fake, "shape", None) != target.shape:
    shape = getattr(fake, "shape", type(fake).__name__)
    raise NetworkError("generator", f"the generator {recipe.qualified_name(pix2pix.generator)} returns {shape} for a "
                       f"{source.shape} source; the step needs the target's shape, {target.shape}.")
  _, d_vars = _init("discriminator", pix2pix.discriminator, {"params": d_key, "dropout": d_key},
                     source, target)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      g_params=g_vars["params"], g_batch_stats=g_vars.get("batch_stats", {}),
      d_params=d_vars["params"], d_batch_stats=d_vars.get("batch_stats", {}),
      g_opt_state=pix2pix.g_optimizer.init(g_vars["params"]),
      d_opt_state=pix2pix.d_optimizer.init(d_vars["params"]),
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


def train_step(state: TrainState, batch, *, pix2pix: Pix2Pix, axis_name: Optional[str] = None):
  """One D update then one G update. Pure: ``jax.jit`` and ``jax.pmap`` it.

  ``batch`` is ``{"A": source, "B": target}``, NHWC float32 in [-1, 1]. With
  ``axis_name`` (under ``pmap``), gradients, metrics and running batch
  statistics are averaged over that axis and each device draws its own dropout
  masks; batch norm uses each device's own statistics unless the networks
  were built to reduce over that axis (``config.model.sync_batch_stats``).
  Jitted over a mesh without ``axis_name`` (``trainer.make_train_step``) the
  step is that of one device holding the global batch: normalisation is
  always over the global batch. Returns the new state and the scalar metrics
  ``pix2pix.metric_names``.
  """
  generator, discriminator = pix2pix.generator, pix2pix.discriminator
  source, target = batch["A"], batch["B"]
  mean = (lambda t: lax.pmean(t, axis_name)) if axis_name is not None else (lambda t: t)

  def generate_fake(g_params):
    fake, updated = generator.apply(
        {"params": g_params, "batch_stats": state.g_batch_stats}, source, train=True,
        rngs={"dropout": _dropout_key(state, axis_name)}, mutable=["batch_stats"])
    return fake, updated.get("batch_stats", {})

  fake, generator_vjp, g_batch_stats = jax.vjp(generate_fake, state.g_params, has_aux=True)

  def apply_discriminator(d_params, d_batch_stats, image, collections=("batch_stats",)):
    logits, updated = discriminator.apply(
        {"params": d_params, "batch_stats": d_batch_stats}, source, image, train=True,
        mutable=list(collections))
    return logits, updated

  def d_objective(d_params):
    # Fake first, then real: the reference's order, which its running stats see.
    fake_logits, updated = apply_discriminator(d_params, state.d_batch_stats, lax.stop_gradient(fake))
    real_logits, updated = apply_discriminator(d_params, updated.get("batch_stats", {}), target)
    d_loss, d_real, d_fake = losses.discriminator_loss(pix2pix.gan_loss, real_logits, fake_logits)
    return d_loss, (updated.get("batch_stats", {}), d_real, d_fake)

  (d_loss, (d_batch_stats, d_real, d_fake)), d_grads = jax.value_and_grad(
      d_objective, has_aux=True)(state.d_params)
  d_updates, d_opt_state = pix2pix.d_optimizer.update(mean(d_grads), state.d_opt_state, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  def discriminate(image):
    # Running statistics computed here are dropped: only the G loss's fake pass updates them.
    logits, updated = apply_discriminator(d_params, d_batch_stats, image, ("batch_stats", "intermediates"))
    return logits, updated.get("intermediates", {})

  def g_objective(fake):
    fake_logits, updated = apply_discriminator(d_params, d_batch_stats, fake, ("batch_stats", "intermediates"))
    inputs = losses.LossInputs(source=source, target=target, fake=fake, fake_logits=fake_logits,
                               fake_features=updated.get("intermediates", {}), discriminate=discriminate)
    g_gan = losses.generator_gan_loss(pix2pix.gan_loss, fake_logits)
    terms = {name: term(inputs) for name, (_, term) in pix2pix.g_losses.items()}
    g_loss = g_gan + sum(weight * terms[name] for name, (weight, _) in pix2pix.g_losses.items())
    return g_loss, (updated.get("batch_stats", {}), g_gan, terms)

  (g_loss, (d_batch_stats, g_gan, terms)), fake_grad = jax.value_and_grad(
      g_objective, has_aux=True)(fake)
  (g_grads,) = generator_vjp(fake_grad)
  g_updates, g_opt_state = pix2pix.g_optimizer.update(mean(g_grads), state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)

  new_state = state.replace(
      step=state.step + 1, g_params=g_params, g_batch_stats=mean(g_batch_stats),
      d_params=d_params, d_batch_stats=mean(d_batch_stats),
      g_opt_state=g_opt_state, d_opt_state=d_opt_state)
  metrics = dict(d_real=d_real, d_fake=d_fake, d_loss=d_loss, g_gan=g_gan,
                 **{f"g_{name}": value for name, value in terms.items()}, g_loss=g_loss)
  return new_state, mean(metrics)


def generate(state: TrainState, images, rng: Optional[jax.Array] = None, mode: str = "eval", *,
             generator):
  """Translates ``images`` (NHWC in [-1, 1]) with ``generator`` and the state's weights.

  ``mode="eval"``: running batch statistics, no dropout (the usual inference).
  ``mode="paper"``: as the paper does at test time (section 3.3), dropout kept
  (drawn from ``rng``) and the statistics of this batch; running stats untouched.
  """
  variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}
  if mode == "eval":
    return generator.apply(variables, images, train=False)
  if mode == "paper":
    if rng is None:
      raise ValueError("generate(mode='paper') draws dropout masks and needs an rng key")
    # Mutable so that modules which always write their running stats in train
    # mode (flax's BatchNorm) run; what they write is dropped.
    return generator.apply(variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])[0]
  raise ValueError(f"mode must be one of {GENERATE_MODES}, got {mode!r}")


def train_steps(state: TrainState, batches, *, pix2pix: Pix2Pix, axis_name: Optional[str] = None):
  """``train_step`` over the leading axis of ``batches`` in one call (``lax.scan``).

  Several steps per dispatch hide the host's launch overhead on accelerators.
  Returns the final state and the metrics of every step, stacked.
  """
  step = lambda state, batch: train_step(state, batch, pix2pix=pix2pix, axis_name=axis_name)
  return lax.scan(step, state, batches)
