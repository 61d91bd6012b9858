"""What the step trains: ``Pix2Pix``, the networks, their optimisers and the objective.

Build one from Python objects (any Flax modules, optax transformations and loss
functions) or from a config with ``Pix2Pix.from_config``, where every piece is
a built-in name or an import path such as ``my_project.nets:AttentionUNet``:

    pix2pix = Pix2Pix.from_config(config, train_examples=400)
    pix2pix = pix2pix.replace(generator=AttentionUNet(), g_losses={**pix2pix.g_losses,
                                                                  "fm": (10.0, feature_matching)})

A generator is called as ``generator.apply(variables, source, train=...)`` and
returns an image with the target's shape; a discriminator as
``discriminator.apply(variables, source, image, train=...)`` and returns logits
(any pytree of arrays). Both keep batch statistics in ``batch_stats`` and draw
dropout from the ``dropout`` RNG, as the built-in networks do.
"""

import dataclasses
import fractions
import importlib
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from p2p_jax import losses, models

GeneratorTerm = Callable[[losses.LossInputs], Any]
SCHEDULES = ("linear", "constant")


def qualified_name(module: nn.Module) -> str:
  """``package.module.Class`` of a network, as errors and checkpoints name it."""
  return f"{type(module).__module__}.{type(module).__qualname__}"


def load_object(path: str, key: str) -> Any:
  """The object an import path ``package.module:name`` (``name`` may be dotted) names.

  A ValueError names ``key`` (the config key that holds the path) when it does not resolve.
  """
  module_name, colon, attribute = path.partition(":")
  if not colon or not module_name or not attribute:
    raise ValueError(f"{key}={path!r} is not an import path of the form package.module:name.")
  try:
    target = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(f"{key}={path!r}: cannot import {module_name!r} ({error}); is its package "
                     "installed or on PYTHONPATH?") from None
  for part in attribute.split("."):
    if not hasattr(target, part):
      raise ValueError(f"{key}={path!r}: {module_name!r} has no attribute {attribute!r}.")
    target = getattr(target, part)
  return target


def _network(model: ml_collections.ConfigDict, role: str, builtins, build_builtin) -> nn.Module:
  """``config.model.<role>``: a built-in name, or the import path of a callable returning a Flax module.

  The callable (a module class, or a function) gets ``config.model.<role>_kwargs``.
  """
  name, key = model[role], f"config.model.{role}"
  if name in builtins:
    return build_builtin()
  if ":" not in name:
    raise ValueError(f"{key}={name!r} is none of the built-in {role}s {builtins} and no import path "
                     "(package.module:name).")
  kwargs = dict(model[f"{role}_kwargs"])
  try:
    network = load_object(name, key)(**kwargs)
  except TypeError as error:
    raise ValueError(f"{key}={name!r} cannot be built with {key}_kwargs={kwargs}: {error}") from None
  if not isinstance(network, nn.Module):
    raise ValueError(f"{key}={name!r} gave a {type(network).__name__}, not a Flax module.")
  return network


LR_UPDATES = ("start_of_epoch", "end_of_epoch")


def linear_decay(lr: float, n_epochs: int, n_epochs_decay: int, steps_per_epoch,
                 update: str = "start_of_epoch") -> optax.Schedule:
  """The reference's 'linear' policy: ``n_epochs`` at ``lr``, then ``n_epochs_decay`` decaying to 0.

  The reference's ``LambdaLR`` rule (``models/networks.py``, ``get_scheduler``)
  with its default ``epoch_count`` of 1, ``1 - max(0, count + 1 - n_epochs) /
  (n_epochs_decay + 1)``, where ``count`` is how many times ``scheduler.step()``
  has been called. Its ``train.py`` calls it at the start of every epoch
  (``update="start_of_epoch"``: epoch e, from 0, runs at count e + 1, so the
  last epoch runs at 0); before 2020 it called it at the end of every epoch
  (``"end_of_epoch"``: count e). A step belongs to the epoch of its batch's
  first example: ``floor(step / steps_per_epoch)``, exactly, for a fractional
  ``steps_per_epoch`` such as ``Fraction(examples, batch_size)``.
  """
  if update not in LR_UPDATES:
    raise ValueError(f"config.optim.lr_update must be one of {LR_UPDATES}, got {update!r}")
  per_epoch = fractions.Fraction(steps_per_epoch).limit_denominator(1 << 16)
  offset = 1 if update == "start_of_epoch" else 0

  def schedule(step):
    count = (jnp.asarray(step) * per_epoch.denominator) // per_epoch.numerator + offset
    factor = 1.0 - jnp.maximum(0, count + 1 - n_epochs) / (n_epochs_decay + 1)
    return lr * jnp.maximum(factor, 0.0)

  return schedule


@dataclasses.dataclass(frozen=True)
class Pix2Pix:
  """The networks, optimisers and objective that ``train.train_step`` trains.

  The generator's loss is ``gan_loss`` on its fakes plus, for every
  ``name: (weight, term)`` of ``g_losses``, ``weight * term(LossInputs)``;
  each term is reported as the metric ``g_<name>``. ``learning_rate`` is only
  reported (as the metric ``learning_rate``): the optimisers hold their own
  schedules.
  """
  generator: nn.Module
  discriminator: nn.Module
  g_optimizer: optax.GradientTransformation
  d_optimizer: optax.GradientTransformation
  gan_loss: losses.GANLoss = losses.vanilla
  g_losses: Mapping[str, Tuple[float, GeneratorTerm]] = dataclasses.field(
      default_factory=lambda: {"l1": (100.0, losses.l1)})
  learning_rate: Optional[optax.Schedule] = None

  def replace(self, **changes) -> "Pix2Pix":
    return dataclasses.replace(self, **changes)

  @property
  def metric_names(self) -> Tuple[str, ...]:
    return ("d_real", "d_fake", "d_loss", "g_gan", *(f"g_{name}" for name in self.g_losses), "g_loss")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, steps_per_epoch,
                  axis_name: Optional[str] = None) -> "Pix2Pix":
    """The pix2pix of ``config``: built-in pieces by name, others by import path.

    ``steps_per_epoch`` is the training split's size over the batch size, a
    fraction (``input_pipeline.steps_per_epoch``). ``axis_name`` is the ``pmap`` axis
    the built-in networks' batch norm reduces over when
    ``config.model.sync_batch_stats`` (``experiments.train``, jitted over a
    mesh, needs none).
    """
    model, loss, optim = config.model, config.loss, config.optim
    bn_axis = axis_name if model.sync_batch_stats else None
    generator = _network(model, "generator", models.GENERATORS,
                         lambda: models.make_generator(model, config.output_nc, bn_axis))
    discriminator = _network(model, "discriminator", models.DISCRIMINATORS,
                             lambda: models.make_discriminator(model, bn_axis))
    schedule = make_schedule(optim, steps_per_epoch, total_steps(config, steps_per_epoch))
    return cls(generator=generator, discriminator=discriminator,
               g_optimizer=make_optimizer(optim, schedule), d_optimizer=make_optimizer(optim, schedule),
               gan_loss=gan_loss_from_config(loss.gan_mode),
               g_losses={"l1": (loss.lambda_l1, losses.l1),
                         **{name: (term.weight, load_object(term.fn, f"config.loss.terms.{name}.fn"))
                            for name, term in loss.terms.items()}},
               learning_rate=schedule)


def gan_loss_from_config(gan_mode: str) -> losses.GANLoss:
  """``config.loss.gan_mode``: a name in ``losses.GAN_LOSSES`` or an import path."""
  if gan_mode in losses.GAN_LOSSES:
    return losses.GAN_LOSSES[gan_mode]
  if ":" not in gan_mode:
    raise ValueError(f"config.loss.gan_mode={gan_mode!r} is none of {tuple(losses.GAN_LOSSES)} and no "
                     "import path (module:function).")
  return load_object(gan_mode, "config.loss.gan_mode")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch) -> int:
  """``num_train_steps`` if positive, else the steps that show every example ``num_epochs`` times.

  With a fractional ``steps_per_epoch`` (``input_pipeline.steps_per_epoch``)
  the last step may run into one more epoch by less than a batch.
  """
  if config.num_train_steps > 0:
    return config.num_train_steps
  return math.ceil(config.num_epochs * fractions.Fraction(steps_per_epoch).limit_denominator(1 << 16))


def make_schedule(optim: ml_collections.ConfigDict, steps_per_epoch, num_steps: int) -> optax.Schedule:
  """``config.optim.schedule``: ``linear`` (the reference's), ``constant``, or an import path.

  An import path names a function ``(optim_config, steps_per_epoch, total_steps)``
  that returns an optax schedule.
  """
  if optim.schedule == "linear":
    return linear_decay(optim.lr, optim.n_epochs, optim.n_epochs_decay, steps_per_epoch, optim.lr_update)
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.lr)
  if ":" not in optim.schedule:
    raise ValueError(f"config.optim.schedule={optim.schedule!r} is none of {SCHEDULES} and no import path "
                     "(module:function).")
  return load_object(optim.schedule, "config.optim.schedule")(optim, steps_per_epoch, num_steps)


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``config.optim.optimizer`` (an optax function's name, or an import path) with ``config.optim.kwargs``.

  It is called as ``optimizer(learning_rate=schedule, **kwargs)``; the
  reference's is Adam with ``b1=0.5, b2=0.999``.
  """
  name = optim.optimizer
  if ":" in name:
    factory = load_object(name, "config.optim.optimizer")
  elif callable(getattr(optax, name, None)):
    factory = getattr(optax, name)
  else:
    raise ValueError(f"config.optim.optimizer={name!r} is no optax function (e.g. 'adam', 'adamw') and no "
                     "import path (module:function).")
  try:
    optimizer = factory(learning_rate=schedule, **dict(optim.kwargs))
  except TypeError as error:
    raise ValueError(f"config.optim.optimizer={name!r} cannot be built with learning_rate and "
                     f"config.optim.kwargs={dict(optim.kwargs)}: {error}") from None
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"config.optim.optimizer={name!r} gave a {type(optimizer).__name__}, not an optax "
                     "GradientTransformation.")
  return optimizer
