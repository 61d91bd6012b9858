"""Orbax checkpoints of a whole training run: state, data position and config.

Each checkpoint step under ``<workdir>/checkpoints`` holds three items:
``state`` (the complete ``TrainState``: parameters, batch statistics, both
optimisers, step and RNG), ``data`` (the step the input stream resumes at) and
``config`` (the run's config, which is what a resumed run is checked against and
what tools rebuild the networks from).
"""

import logging as std_logging
import os
from typing import Any, Dict, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from p2p_jax import train

CHECKPOINT_DIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"
# Config keys that may differ between a run and its resumption: they change
# neither the state's layout nor the training trajectory up to the resumed step.
RESUMABLE_KEYS = frozenset({
    "data_dir", "verify_checksums", "cache", "skip_bad_files", "eval_split", "num_epochs", "num_train_steps",
    "log_every_steps", "checkpoint_every_steps", "sample_every_steps", "keep_checkpoints",
    "num_sample_images", "model.conv_impl", "model.upconv_impl",
})


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
              CONFIG: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, state: train.TrainState, step: int,
         config: ml_collections.ConfigDict) -> None:
  """Saves (asynchronously) the state after ``step`` steps; the stream resumes at ``step``."""
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave({"start_step": step}),
      CONFIG: ocp.args.JsonSave(config.to_dict()),
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
  restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])


def abstract_state(config: ml_collections.ConfigDict,
                   sharding: jax.sharding.Sharding) -> train.TrainState:
  """The shapes and dtypes of ``config``'s TrainState, placed with ``sharding``."""
  image_shape = (config.crop_size, config.crop_size, 3)
  shapes = jax.eval_shape(lambda key: train.create_train_state(key, config, image_shape),
                          jax.random.key(0))
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore(manager: ocp.CheckpointManager, step: int, config: ml_collections.ConfigDict,
            sharding: jax.sharding.Sharding):
  """Returns ``(state, start_step)`` of checkpoint ``step``, placed with ``sharding``.

  The arrays are read into the given sharding, whatever device layout wrote them.
  """
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state(config, sharding)),
      DATA: ocp.args.JsonRestore(),
  }))
  return restored[STATE], restored[DATA]["start_step"]


def flatten_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Every value of ``config`` under its dotted key, e.g. ``{"model.ngf": 64, ...}``."""
  def flatten(tree, prefix):
    flat = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        flat.update(flatten(value, f"{prefix}{key}."))
      else:
        flat[f"{prefix}{key}"] = value
    return flat
  return flatten(config.to_dict(), "")


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     where: str) -> None:
  """Raises a ValueError naming every key outside RESUMABLE_KEYS that differs."""
  missing = "<absent>"
  old, new = flatten_config(saved), flatten_config(config)
  differing = sorted(key for key in old.keys() | new.keys()
                     if key not in RESUMABLE_KEYS and old.get(key, missing) != new.get(key, missing))
  if differing:
    changes = "; ".join(f"config.{key}: {old.get(key, missing)!r} in the checkpoint, "
                        f"{new.get(key, missing)!r} now" for key in differing)
    raise ValueError(
        f"{where} holds a checkpoint of a different run ({changes}). It was left untouched: "
        "use another --workdir, or the checkpoint's values for these keys to resume it.")


def load_config(workdir, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config of the latest checkpoint in ``workdir`` (or of ``step``)."""
  manager = make_manager(workdir, create=False)
  return restore_config(manager, _checked_step(manager, step))


def load_state(workdir, step: Optional[int] = None,
               sharding: Optional[jax.sharding.Sharding] = None) -> train.TrainState:
  """The latest ``TrainState`` in ``workdir`` (or that of ``step``).

  By default the arrays go to the first local device; pass ``sharding`` to
  place them elsewhere (for example replicated over a mesh).
  """
  manager = make_manager(workdir, create=False)
  step = _checked_step(manager, step)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state, _ = restore(manager, step, restore_config(manager, step), sharding)
  return state
