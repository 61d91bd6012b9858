"""Orbax checkpoints of a whole training run: state, data position, config and networks.

Each checkpoint step under ``<workdir>/checkpoints`` holds four items:
``state`` (the complete ``TrainState``: parameters, batch statistics, both
optimisers, step and RNG), ``data`` (the step the input stream resumes at),
``config`` (the run's config, which is what a resumed run is checked against and
what tools rebuild the networks from) and ``networks`` (the classes of the two
networks, so a run trained with networks given as Python objects is not
mistaken for the ones its config names).
"""

import logging as std_logging
import os
from typing import Dict, NamedTuple, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from p2p_jax import configuration, recipe, train

CHECKPOINT_DIR = "checkpoints"
STATE, DATA, CONFIG, NETWORKS = "state", "data", "config", "networks"


def _not_orbax_info(record: std_logging.LogRecord) -> bool:
  return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Hides orbax's INFO lines (about twenty per save) from the log; its warnings stay."""
  logger = logging.get_absl_logger()
  if _not_orbax_info not in logger.filters:
    logger.addFilter(_not_orbax_info)


def workdir_path(workdir) -> epath.Path:
  """``workdir`` as a path: a local one made absolute, a URL (``gs://bucket/run``) kept.

  The processes of a multi-host run write one checkpoint together, so their
  workdir must be shared, e.g. a Cloud Storage bucket; pathlib would turn that
  URL into a local folder named "gs:".
  """
  if "://" in str(workdir):
    return epath.Path(workdir)
  return epath.Path(os.path.abspath(os.path.expanduser(workdir)))


def checkpoint_dir(workdir) -> epath.Path:
  return workdir_path(workdir) / CHECKPOINT_DIR


def make_manager(workdir, *, max_to_keep: Optional[int] = None,
                 create: bool = True) -> ocp.CheckpointManager:
  """A manager for ``<workdir>/checkpoints`` that keeps the ``max_to_keep`` latest steps.

  Readers pass ``create=False`` (and no ``max_to_keep``, so nothing is ever deleted).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
              CONFIG: ocp.JsonCheckpointHandler(), NETWORKS: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def network_classes(pix2pix: recipe.Pix2Pix) -> Dict[str, str]:
  """The qualified class names of ``pix2pix``'s networks, as a checkpoint records them."""
  return {role: recipe.qualified_name(getattr(pix2pix, role)) for role in ("generator", "discriminator")}


def save(manager: ocp.CheckpointManager, state: train.TrainState, step: int,
         config: ml_collections.ConfigDict, pix2pix: recipe.Pix2Pix) -> None:
  """Saves (asynchronously) the state after ``step`` steps; the stream resumes at ``step``."""
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave({"start_step": step}),
      CONFIG: ocp.args.JsonSave(config.to_dict()),
      NETWORKS: ocp.args.JsonSave(network_classes(pix2pix)),
  }))


def _checked_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}: train with "
                            "`python -m experiments.train --workdir ...` first.")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"No checkpoint for step {step} in {manager.directory}; it holds steps "
                     f"{sorted(steps)}.")
  return step


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config of checkpoint ``step``, in today's keys (``configuration.upgrade``)."""
  restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return configuration.upgrade(restored[CONFIG])


def _restore_networks(manager: ocp.CheckpointManager, step: int) -> Optional[Dict[str, str]]:
  if not (epath.Path(manager.directory) / str(step) / NETWORKS).exists():
    return None  # Written before checkpoints recorded the networks.
  return manager.restore(step, args=ocp.args.Composite(**{NETWORKS: ocp.args.JsonRestore()}))[NETWORKS]


def abstract_state(pix2pix: recipe.Pix2Pix, shapes, sharding: jax.sharding.Sharding) -> train.TrainState:
  """The shapes and dtypes of ``pix2pix``'s TrainState for examples of ``shapes``, placed with ``sharding``."""
  state = jax.eval_shape(lambda key: train.create_train_state(key, pix2pix, shapes), jax.random.key(0))
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore(manager: ocp.CheckpointManager, step: int, pix2pix: recipe.Pix2Pix, shapes,
            sharding: jax.sharding.Sharding):
  """Returns ``(state, start_step)`` of checkpoint ``step``, placed with ``sharding``.

  The arrays are read into the given sharding, whatever device layout wrote them.
  """
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state(pix2pix, shapes, sharding)),
      DATA: ocp.args.JsonRestore(),
  }))
  return restored[STATE], restored[DATA]["start_step"]


def pix2pix_of(manager: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict,
               pix2pix: Optional[recipe.Pix2Pix] = None) -> recipe.Pix2Pix:
  """``pix2pix``, or the one ``config`` builds; a ValueError if the checkpoint trained other networks."""
  if pix2pix is not None:
    return pix2pix
  built = recipe.Pix2Pix.from_config(config, steps_per_epoch=1)  # The schedule does not shape the state.
  recorded = _restore_networks(manager, step)
  for role, name in network_classes(built).items():
    if recorded is not None and recorded[role] != name:
      raise ValueError(
          f"Checkpoint {step} in {manager.directory} was trained with the {role} {recorded[role]}, "
          f"which its config does not name (config.model.{role}={config.model[role]!r}): the networks "
          "were given as Python objects. Load it from Python, passing the same networks, e.g. "
          f"p2p_jax.load_generator(workdir, generator=...).")
  return built


def load_config(workdir, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config of the latest checkpoint in ``workdir`` (or of ``step``)."""
  manager = make_manager(workdir, create=False)
  return restore_config(manager, _checked_step(manager, step))


class Run(NamedTuple):
  """A checkpoint of a run, loaded: its state, config (today's keys) and networks."""
  state: train.TrainState
  config: ml_collections.ConfigDict
  pix2pix: recipe.Pix2Pix


def load_run(workdir, step: Optional[int] = None, *, pix2pix: Optional[recipe.Pix2Pix] = None,
             sharding: Optional[jax.sharding.Sharding] = None) -> Run:
  """The latest checkpoint in ``workdir`` (or that of ``step``).

  The networks are those the checkpoint's config names, unless ``pix2pix``
  gives them (as for a run trained with networks given as objects). By
  default the arrays go to the first local device; pass ``sharding`` to place
  them elsewhere (for example replicated over a mesh).
  """
  manager = make_manager(workdir, create=False)
  step = _checked_step(manager, step)
  config = restore_config(manager, step)
  pix2pix = pix2pix_of(manager, step, config, pix2pix)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state, _ = restore(manager, step, pix2pix, configuration.image_shapes(config), sharding)
  return Run(state, config, pix2pix)


def load_state(workdir, step: Optional[int] = None, *, pix2pix: Optional[recipe.Pix2Pix] = None,
               sharding: Optional[jax.sharding.Sharding] = None) -> train.TrainState:
  """The ``TrainState`` of ``load_run``: the latest checkpoint in ``workdir`` (or that of ``step``)."""
  return load_run(workdir, step, pix2pix=pix2pix, sharding=sharding).state
