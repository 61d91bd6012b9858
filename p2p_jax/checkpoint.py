"""Orbax checkpoints of a whole training run, checked when they are read back.

Each checkpoint step under ``<workdir>/checkpoints`` holds five items:
``state`` (the complete ``TrainState``: parameters, batch statistics, both
optimisers, step and RNG), ``data`` (the step the input stream resumes at),
``config`` (the run's config, which is what a resumed run is checked against and
what tools rebuild the networks from), ``networks`` (the classes of the two
networks, so a run trained with networks given as Python objects is not
mistaken for the ones its config names) and ``checksums`` (two 32-bit sums of
every array, so that changed bytes are found when the state is read back).

A checkpoint that cannot be read back as written raises a
``DamagedCheckpointError`` naming its step and the file or array that is
wrong; the training loop then resumes from the newest intact one and sets the
damaged ones aside in ``<workdir>/checkpoints_damaged``. A save that fails
(a full disk) raises a ``CheckpointSaveError`` at the next step.
"""

import errno
import json
import logging as std_logging
import os
import re
import shutil
import sys
import time
from typing import Dict, List, NamedTuple, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from p2p_jax import configuration, recipe, train

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
STATE, DATA, CONFIG, NETWORKS, CHECKSUMS = "state", "data", "config", "networks", "checksums"
# The JSON files orbax writes into a step and each of its items (and
# <item>/array_metadatas/process_<i>), which a damaged disk can leave empty or cut.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata", "_sharding")
_TMP_MARKER = ".orbax-checkpoint-tmp"


class DamagedCheckpointError(ValueError):
  """A checkpoint cannot be read back as it was written; says which step, and which file or array."""

  def __init__(self, step: int, directory, what: str):
    super().__init__(f"Checkpoint {step} in {directory} is damaged: {what}")
    self.step, self.directory, self.what = step, directory, what


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (e.g. a full disk); the checkpoints before it are kept."""


def _not_orbax_noise(record: std_logging.LogRecord) -> bool:
  if "/orbax/" not in record.pathname:
    return True
  # A failed background save logs its traceback; check_saved reports it in one line.
  return record.levelno > std_logging.INFO and not (record.levelno >= std_logging.ERROR and record.exc_info)


def quiet_orbax_logs() -> None:
  """Hides orbax's INFO lines (about twenty per save) and its tracebacks from the log; its warnings stay."""
  logger = logging.get_absl_logger()
  if _not_orbax_noise not in logger.filters:
    logger.addFilter(_not_orbax_noise)


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


def _is_abandoned_io(record) -> bool:
  """An orbax read or write left running (or failing) when a failed restore or save closed its event loop."""
  code = getattr(record.object, "cr_code", None)
  if code is not None and "/orbax/" in code.co_filename:
    return True
  return isinstance(record.exc_value, RuntimeError) and "Event loop is closed" in str(record.exc_value)


class _AbandonedIoFilter(std_logging.Filter):
  """Drops asyncio's reports of abandoned tasks: any never retrieved, and orbax's at shutdown."""

  def filter(self, record):
    message = record.getMessage()
    if "exception was never retrieved" in message:
      return False
    return not ("unhandled exception during asyncio.run() shutdown" in message and "/orbax/" in message)


def _quiet_abandoned_io() -> None:
  """Hides the tracebacks of the reads and writes a failed restore or save abandons.

  When one array cannot be read or written, orbax closes its event loop while
  those of the others still run; Python prints each one's error ("Event loop
  is closed", its own) when it is collected, and asyncio logs those that fail
  as ``asyncio.run()`` shuts down: hundreds of lines saying nothing
  that the DamagedCheckpointError or CheckpointSaveError does not. Other
  unraisable exceptions still print.
  """
  hook = sys.unraisablehook
  if getattr(hook, "p2p_jax_quiet", False):
    return

  def quiet_hook(record):
    if not _is_abandoned_io(record):
      hook(record)

  quiet_hook.p2p_jax_quiet = True
  sys.unraisablehook = quiet_hook
  std_logging.getLogger("asyncio").addFilter(_AbandonedIoFilter())


def make_manager(workdir, *, max_to_keep: Optional[int] = None,
                 create: bool = True) -> ocp.CheckpointManager:
  """A manager for ``<workdir>/checkpoints`` that keeps the ``max_to_keep`` latest steps.

  Readers pass ``create=False`` (and no ``max_to_keep``, so nothing is ever deleted).
  """
  _quiet_abandoned_io()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  handlers = {STATE: ocp.StandardCheckpointHandler(),
              **{item: ocp.JsonCheckpointHandler() for item in (DATA, CONFIG, NETWORKS, CHECKSUMS)}}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def network_classes(pix2pix: recipe.Pix2Pix) -> Dict[str, str]:
  """The qualified class names of ``pix2pix``'s networks, as a checkpoint records them."""
  return {role: recipe.qualified_name(getattr(pix2pix, role)) for role in ("generator", "discriminator")}


def _array_name(path) -> str:
  """``g_opt_state/0/mu/up_3/kernel``: a state array's path, as on disk (tuple positions as numbers)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (narrower types widened, wider ones split)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jnp.ravel(lax.bitcast_convert_type(x, bits)).astype(jnp.uint32)


@jax.jit
def _sums(leaves) -> List[jax.Array]:
  """Per array, two position-weighted sums of its words, mod 2^32.

  Every weight is odd, so a change of any one word changes the first sum
  (d * odd is never 0 mod 2^32 for 0 < |d| < 2^32); the second, with other
  weights, leaves changes of many words a 2^-64 chance of passing. Integer
  sums are exact whatever the order, so any device layout gives the same.
  Both sums are one reduction over the words (``lax.reduce`` of a pair):
  computed as two, XLA kept each array's words and weights in temporary
  buffers, twice the state (1309 MiB for the 256 px model's, BENCHMARKS.md).
  """
  result = []
  for leaf in leaves:
    words = _words(leaf)
    i = lax.iota(jnp.uint32, words.size)
    first = words * (2 * i + 1)
    second = (words ^ (words >> 13)) * ((i * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | 1)
    zero = jnp.uint32(0)
    sums = lax.reduce((first, second), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,))
    result.append(jnp.stack(sums))
  return result


def array_checksums(state) -> Dict[str, List[int]]:
  """``{array name: [sum, sum]}`` of every array of ``state`` (computed where the arrays are)."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
  values = [np.asarray(s.addressable_data(0)) for s in _sums(list(leaves))]  # Replicated: any copy.
  return {_array_name(path): [int(v) for v in value] for path, value in zip(paths, values)}


def _free_bytes(directory: epath.Path) -> Optional[int]:
  """Free bytes on the file system of ``directory`` (or its nearest existing parent); None for URLs."""
  if "://" in str(directory):
    return None
  path = os.fspath(directory)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _bytes_on_disk(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory)
             for name in names)


def check_free_space(manager: ocp.CheckpointManager, state, step: int) -> None:
  """Raises a CheckpointSaveError before a save that the disk cannot hold (where it tells its space).

  A save needs about what the newest checkpoint takes on disk, or before the
  first one the arrays' size (an upper bound: orbax compresses).
  """
  directory = epath.Path(manager.directory)
  free = _free_bytes(directory)
  if free is None:
    return
  latest = manager.latest_step()
  needed = (_bytes_on_disk(os.fspath(directory / str(latest))) if latest is not None else
            sum(x.nbytes for x in jax.tree_util.tree_leaves(state))) + (1 << 16)
  if free < needed:
    raise CheckpointSaveError(
        f"Not enough space for checkpoint {step} in {directory}: it needs about {needed / 2**20:.1f} "
        f"MB, the disk has {free / 2**20:.1f} MB free. The checkpoints already there are kept; free "
        "some space (or set a workdir on a larger disk) and run again to resume.")


def _partial_saves(manager: ocp.CheckpointManager) -> List[epath.Path]:
  directory = epath.Path(manager.directory)
  return [p for p in directory.iterdir() if _TMP_MARKER in p.name] if directory.exists() else []


def _remove_partial_save(partial: epath.Path, attempts: int = 50) -> None:
  """Removes a failed save's directory, retrying while its last writes land.

  The save's thread reports the first failed array while tensorstore may still
  be writing the others into it (and creating directories for them).
  """
  for _ in range(attempts):
    try:
      partial.rmtree(missing_ok=True)
    except OSError as error:
      if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):
        raise
    time.sleep(0.1)  # A write landing now would bring a directory back.
    if not partial.exists():
      return
  logging.warning("Could not remove the partial save %s; delete it by hand.", partial)


def _save_failed(manager: ocp.CheckpointManager, step: int, error: BaseException,
                 outside: Optional[BaseException] = None) -> CheckpointSaveError:
  """The error for a failed save of ``step``, once its partial files are removed."""
  if jax.process_index() == 0:
    for partial in _partial_saves(manager):
      _remove_partial_save(partial)
  free = _free_bytes(epath.Path(manager.directory))
  space = f"; the disk has {free / 2**20:.1f} MB free" if free is not None else ""
  latest = manager.latest_step()
  if free is not None and latest is not None:
    space += f", a checkpoint takes {_bytes_on_disk(os.fspath(epath.Path(manager.directory) / str(latest))) / 2**20:.1f} MB"
  return CheckpointSaveError(
      f"Saving checkpoint {step} to {manager.directory} failed: {_innermost_message(error, outside)}{space}. "
      "Its partial files were removed and the checkpoints before it are kept: free some space "
      "(or fix the disk) and run again to resume from the latest.")


def save(manager: ocp.CheckpointManager, state: train.TrainState, step: int,
         config: ml_collections.ConfigDict, pix2pix: recipe.Pix2Pix) -> None:
  """Saves (asynchronously) the state after ``step`` steps; the stream resumes at ``step``.

  ``check_saved`` reports whether the write succeeded; call it for the
  previous save before this one, which would otherwise report its failure.
  """
  check_free_space(manager, state, step)
  try:
    manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave({"start_step": step}),
        CONFIG: ocp.args.JsonSave(config.to_dict()),
        NETWORKS: ocp.args.JsonSave(network_classes(pix2pix)),
        CHECKSUMS: ocp.args.JsonSave(array_checksums(state)),
    }))
  except Exception as error:  # pylint: disable=broad-except  # What the file system said, in orbax's words.
    raise _save_failed(manager, step, error) from None


def check_saved(manager: ocp.CheckpointManager, step: int, wait: bool = False) -> None:
  """Raises a CheckpointSaveError if the save of ``step`` failed, after removing what it left.

  Without ``wait`` it only looks at a save that has finished (cheap, every
  step); with ``wait`` it waits for the one under way. The processes of a
  multi-host run can see a save finish at different steps, and must stop
  together: for them only ``wait`` looks.
  """
  if not wait and (jax.process_count() > 1 or manager.is_saving_in_progress()):
    return
  outside = sys.exc_info()[1]  # Called while handling an error that the disk caused too.
  try:
    manager.wait_until_finished()  # Raises what the finished save's thread raised.
  except Exception as error:  # pylint: disable=broad-except  # Whatever the write raised in its thread.
    raise _save_failed(manager, step, error, outside) from None


def _kept_steps(manager: ocp.CheckpointManager) -> List[int]:
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}: train with "
                            "`python -m experiments.train --workdir ...` first.")
  return steps


def checkpoint_steps(workdir) -> List[int]:
  """The steps of the checkpoints kept in ``workdir``, oldest first; FileNotFoundError if none."""
  return _kept_steps(make_manager(workdir, create=False))


def _checked_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
  steps = _kept_steps(manager)
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"No checkpoint for step {step} in {manager.directory}; it holds steps "
                     f"{sorted(steps)}.")
  return step


def _innermost_message(error: BaseException, outside: Optional[BaseException] = None) -> str:
  """The first line of the innermost cause: what the file system or tensorstore said.

  ``outside``: an exception being handled where ``error`` was raised, which is
  its context but not its cause.
  """
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None or inner is outside:
      break
    error = inner
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= 400 else f"{text[:200]} ... {text[-190:]}"  # The end says why (ENOSPC).


def _check_json_files(manager: ocp.CheckpointManager, step: int, names) -> None:
  """The JSON files of the step and of its items ``names`` must parse: a cut or emptied one is named."""
  step_dir = epath.Path(manager.directory) / str(step)
  if not step_dir.is_dir():
    return
  items = [step_dir / name for name in names if (step_dir / name).is_dir()]
  metadatas = [p for item in items if (item / "array_metadatas").is_dir()
               for p in (item / "array_metadatas").iterdir()]
  candidates = [step_dir / name for name in _JSON_FILES] + [
      item / name for item in items for name in _JSON_FILES] + metadatas
  for path in candidates:
    if path.is_file():
      text = path.read_text()
      try:
        json.loads(text)
      except ValueError as error:
        what = "is empty" if not text.strip() else f"is not valid JSON ({error})"
        raise DamagedCheckpointError(step, manager.directory, f"{path} {what}.") from None


def _read(manager: ocp.CheckpointManager, step: int, **items):
  """``manager.restore`` of ``items``, their JSON files checked first (``_restore_items``)."""
  _check_json_files(manager, step, items)
  return _restore_items(manager, step, items)


def _restore_items(manager: ocp.CheckpointManager, step: int, items):
  """``manager.restore`` of ``items``; a DamagedCheckpointError says what of the step cannot be read."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # pylint: disable=broad-except  # tensorstore raises many kinds.
    message = _innermost_message(error)
    array = re.search(r'Error reading "([^"]+?)/[\d.]+"', message)
    what = f"the state array {array.group(1).replace('.', '/')} cannot be read" if array else (
        f"{', '.join(items)} cannot be read")
    raise DamagedCheckpointError(step, manager.directory, f"{what} ({message}); a file under "
                                 f"{epath.Path(manager.directory) / str(step)} is truncated or damaged.") from None


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  return (epath.Path(manager.directory) / str(step) / item).exists()


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config of checkpoint ``step``, in today's keys (``configuration.upgrade``)."""
  return configuration.upgrade(_read(manager, step, **{CONFIG: ocp.args.JsonRestore()})[CONFIG])


def _restore_networks(manager: ocp.CheckpointManager, step: int) -> Optional[Dict[str, str]]:
  if not _has_item(manager, step, NETWORKS):
    return None  # Written before checkpoints recorded the networks.
  return _read(manager, step, **{NETWORKS: ocp.args.JsonRestore()})[NETWORKS]


def abstract_state(pix2pix: recipe.Pix2Pix, shapes, sharding: jax.sharding.Sharding) -> train.TrainState:
  """The shapes and dtypes of ``pix2pix``'s TrainState for examples of ``shapes``, placed with ``sharding``."""
  state = jax.eval_shape(lambda key: train.create_train_state(key, pix2pix, shapes), jax.random.key(0))
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _check_layout(manager: ocp.CheckpointManager, step: int, target) -> None:
  """The saved state must have the target's arrays and shapes: other networks are no damage."""
  try:
    saved = manager.item_metadata(step)[STATE]
  except Exception as error:  # pylint: disable=broad-except
    raise DamagedCheckpointError(step, manager.directory,
                                 f"the state's metadata cannot be read ({_innermost_message(error)}).") from None
  on_disk = {_array_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
  wanted = {_array_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  if on_disk != wanted:
    differing = sorted(n for n in on_disk.keys() | wanted.keys() if on_disk.get(n) != wanted.get(n))
    details = "; ".join(f"{n}: {on_disk.get(n, 'absent')} saved, {wanted.get(n, 'absent')} now"
                        for n in differing[:3])
    raise ValueError(f"Checkpoint {step} in {manager.directory} holds the state of other networks than "
                     f"these ({len(differing)} arrays differ: {details}).")


def restore(manager: ocp.CheckpointManager, step: int, pix2pix: recipe.Pix2Pix, shapes,
            sharding: jax.sharding.Sharding):
  """Returns ``(state, start_step)`` of checkpoint ``step``, placed with ``sharding``, checked.

  The arrays are read into the given sharding, whatever device layout wrote
  them, and compared with the checksums saved with them (checkpoints written
  before checksums existed are read unchecked).
  """
  target = abstract_state(pix2pix, shapes, sharding)
  items = {STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()}
  if _has_item(manager, step, CHECKSUMS):
    items[CHECKSUMS] = ocp.args.JsonRestore()
  _check_json_files(manager, step, items)  # Before the layout: it reads the state's metadata.
  _check_layout(manager, step, target)
  restored = _restore_items(manager, step, items)
  if CHECKSUMS in items:
    actual = array_checksums(restored[STATE])
    wrong = [name for name, value in actual.items() if restored[CHECKSUMS].get(name) != value]
    if wrong:
      more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
      raise DamagedCheckpointError(step, manager.directory, f"the state array {wrong[0]}{more} does not match "
                                   "the checksum saved with it: its bytes changed after it was written.")
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
          f"p2p_jax.checkpoint.load_run(workdir, pix2pix=...).")
  return built


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves a damaged step out of ``checkpoints/`` into ``checkpoints_damaged/`` (kept, not deleted)."""
  source = epath.Path(manager.directory) / str(step)
  aside = epath.Path(manager.directory).parent / DAMAGED_DIR
  target, n = aside / str(step), 1
  while target.exists():
    target, n = aside / f"{step}-{n}", n + 1
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  manager.reload()
  return target


def load_config(workdir, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config of the latest checkpoint in ``workdir`` (or of ``step``)."""
  manager = make_manager(workdir, create=False)
  return restore_config(manager, _checked_step(manager, step))


class Run(NamedTuple):
  """A checkpoint of a run, loaded: its state, config (today's keys) and networks."""
  state: train.TrainState
  config: ml_collections.ConfigDict
  pix2pix: recipe.Pix2Pix


def _load(manager, step, pix2pix, sharding) -> Run:
  config = restore_config(manager, step)
  pix2pix = pix2pix_of(manager, step, config, pix2pix)
  state, _ = restore(manager, step, pix2pix, configuration.image_shapes(config), sharding)
  return Run(state, config, pix2pix)


def load_run(workdir, step: Optional[int] = None, *, pix2pix: Optional[recipe.Pix2Pix] = None,
             sharding: Optional[jax.sharding.Sharding] = None) -> Run:
  """The latest checkpoint in ``workdir`` (or that of ``step``), checked.

  The networks are those the checkpoint's config names, unless ``pix2pix``
  gives them (as for a run trained with networks given as objects). By
  default the arrays go to the first local device; pass ``sharding`` to place
  them elsewhere (for example replicated over a mesh). A damaged checkpoint
  raises a DamagedCheckpointError that also says which steps are intact.
  """
  manager = make_manager(workdir, create=False)
  step = _checked_step(manager, step)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    return _load(manager, step, pix2pix, sharding)
  except DamagedCheckpointError as error:
    intact = []
    for other in sorted(set(manager.all_steps()) - {step}, reverse=True):
      try:
        _load(manager, other, pix2pix, sharding)
        intact.append(other)
      except DamagedCheckpointError:
        pass
    advice = (f" Intact: {intact}; pick one with step={intact[0]}." if intact else
              " No other checkpoint of this run is intact.")
    raise DamagedCheckpointError(step, manager.directory, error.what + advice) from None


def load_state(workdir, step: Optional[int] = None, *, pix2pix: Optional[recipe.Pix2Pix] = None,
               sharding: Optional[jax.sharding.Sharding] = None) -> train.TrainState:
  """The ``TrainState`` of ``load_run``: the latest checkpoint in ``workdir`` (or that of ``step``)."""
  return load_run(workdir, step, pix2pix=pix2pix, sharding=sharding).state
