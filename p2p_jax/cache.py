"""Local caches that make a run's second start fast: compiled programs, executables, image scans.

All live under ``root()``: ``$P2P_JAX_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/p2p_jax`` (``~/.cache/p2p_jax``), where the synthetic
dataset is kept too. ``P2P_JAX_CACHE_DIR=off`` keeps none of them.

- Compiled programs: JAX's persistent compilation cache, in
  ``xla/<machine>/``, one folder per CPU model and instruction set, so that a
  home folder shared by different machines never hands one CPU code compiled
  for another. ``import p2p_jax`` turns it on (``enable_compilation_cache``)
  unless JAX's own setting (``jax_compilation_cache_dir``,
  ``$JAX_COMPILATION_CACHE_DIR``) names a folder already. JAX keys each entry
  by the program, its options, the XLA flags and the JAX version.
- Executables: ``KeptExecutable`` keeps a jitted function's whole compiled
  executable in ``executables/<machine>/``, keyed by a description of what
  the function computes (the caller's: for a training run, the config that
  built its networks, optimisers and losses) and by everything else its trace
  reads (``environment()``: the sources of p2p_jax, jax, flax and optax, the
  package versions, JAX's and Flax's settings, the XLA and JAX environment,
  the devices). A start that finds it skips tracing and lowering, which JAX
  must do before it can look a program up in its own cache: about 2 s of a
  128 px run's start. Kept when compiled, not when JAX loads them from its
  own cache. Code patched at run time is not part of the key, so
  only callers that run the library's own code as installed use it (the
  entry point ``experiments.train``); the least recently used beyond
  ``KEPT_EXECUTABLES`` are deleted.
- Image scans: ``scans/<folder>.json`` records what each file of a folder
  holds (``images.ImageInfo``) with the file's size, modification and change
  times and inode when it was decoded. A file whose record matches is not
  decoded again; any other is, so a file replaced or damaged since is still
  named before a run starts. Only files that decoded are recorded.

The cache is trusted as the code is (JAX's compiled programs run as they are
loaded): keep it where only you can write.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import pathlib
import pickle
import platform
import re
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import flax
import jax
from jax.experimental import serialize_executable
import numpy as np

ENV = "P2P_JAX_CACHE_DIR"
_OFF = ("", "0", "off", "false", "no", "none")
_SCAN_VERSION = 1
_INFO_FIELDS = 5  # images.ImageInfo: width, height, channels, bits, format


def default_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "p2p_jax"


def root() -> Optional[pathlib.Path]:
  """The cache folder, or None when ``$P2P_JAX_CACHE_DIR`` turns caching off."""
  value = os.environ.get(ENV)
  if value is None:
    return default_root()
  if value.strip().lower() in _OFF:
    return None
  return pathlib.Path(value).expanduser()


def _cpu_description() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as file:
      lines = file.read().splitlines()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"
  first = {}
  for line in lines:
    key, _, value = line.partition(":")
    first.setdefault(key.strip(), value.strip())
  flags = " ".join(sorted((first.get("flags") or first.get("Features") or "").split()))
  return f"{first.get('model name') or first.get('CPU part', '')}|{flags}"


def machine_key() -> str:
  """This CPU's model and instruction sets as a folder name: ``<model>-<hash of model and flags>``."""
  description = _cpu_description()
  model = re.sub(r"[^A-Za-z0-9]+", "-", description.split("|")[0]).strip("-")[:40] or platform.machine()
  return f"{model}-{hashlib.sha256(description.encode()).hexdigest()[:12]}"


def _writable_folder(path: pathlib.Path, what: str) -> Optional[pathlib.Path]:
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as error:
    logging.warning("%s=%s: cannot keep %s there (%s); running without. Set %s to a writable folder, "
                    "or to off.", ENV, root(), what, error, ENV)
    return None
  return path


def enable_compilation_cache() -> Optional[pathlib.Path]:
  """Turns on JAX's persistent compilation cache in ``xla/<machine_key()>``; returns the folder.

  None, changing nothing, when caching is off or the user set JAX's own
  folder. Applies to compilations after it, the library's and the user's.
  """
  base = root()
  if base is None or jax.config.jax_compilation_cache_dir:
    return None
  folder = _writable_folder(base / "xla" / machine_key(), "compiled programs")
  if folder is not None:
    jax.config.update("jax_compilation_cache_dir", str(folder))
  return folder


ScanRecord = Tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def stat_record(path: pathlib.Path) -> ScanRecord:
  """What must match for a file's recorded scan to stand: size, mtime, ctime (ns) and inode."""
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _scan_file(folder: pathlib.Path) -> Optional[pathlib.Path]:
  base = root()
  if base is None:
    return None
  name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
  return base / "scans" / f"{name}.json"


def read_scan(folder: pathlib.Path) -> Dict[str, Tuple[ScanRecord, tuple]]:
  """``{file name: (stat record, info fields)}`` recorded for ``folder``; {} if none or unreadable."""
  path = _scan_file(folder)
  if path is None:
    return {}
  try:
    data = json.loads(path.read_text())
    if data["version"] != _SCAN_VERSION or data["folder"] != str(folder.resolve()):
      return {}
    files = {name: (tuple(stat), tuple(info)) for name, (stat, info) in data["files"].items()}
  except (OSError, ValueError, TypeError, KeyError, AttributeError):  # None, damaged or of another layout.
    return {}
  if any(len(stat) != 4 or len(info) != _INFO_FIELDS for stat, info in files.values()):
    return {}
  return files


def write_scan(folder: pathlib.Path, files: Dict[str, Tuple[ScanRecord, Sequence]]) -> None:
  """Records ``files`` for ``folder``, replacing its record atomically; a failure only logs."""
  path = _scan_file(folder)
  if path is None:
    return
  data = {"version": _SCAN_VERSION, "folder": str(folder.resolve()),
          "files": {name: [list(stat), list(info)] for name, (stat, info) in sorted(files.items())}}
  write_json(path, data, f"the scan of {folder}")


def write_json(path: pathlib.Path, data, what: str) -> None:
  """Writes ``data`` to ``path`` as JSON, replacing it atomically; a failure only logs, naming ``what``."""
  _replace_file(path, json.dumps(data).encode(), what)


def _replace_file(path: pathlib.Path, data: bytes, what: str) -> None:
  """Writes ``data`` to ``path``, replacing it atomically; a failure only logs, naming ``what``."""
  if _writable_folder(path.parent, what) is None:
    return
  staged = None
  try:
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as file:
      staged = file.name
      file.write(data)
    os.replace(staged, path)
  except OSError as error:
    logging.warning("Could not record %s in %s: %s", what, path, error)
    if staged is not None:
      pathlib.Path(staged).unlink(missing_ok=True)


KEPT_EXECUTABLES = 16
# Code a trace runs: its sources are part of every executable's key.
_TRACED_PACKAGES = ("p2p_jax", "jax", "flax", "optax")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
_ENVIRONMENT_PREFIXES = ("JAX_", "XLA_", "FLAX_", "P2P_JAX_", "TPU_", "LIBTPU_")


@functools.lru_cache(maxsize=None)
def _source_stamps() -> str:
  """A digest of the path, size and modification time of every Python file of ``_TRACED_PACKAGES``."""
  digest = hashlib.sha256()
  for name in _TRACED_PACKAGES:
    package = pathlib.Path(importlib.import_module(name).__file__).parent
    for path in sorted(package.rglob("*.py")):
      stat = path.stat()
      digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def environment(devices: Sequence[jax.Device]) -> Dict[str, Any]:
  """Everything besides the caller's description that a trace on ``devices`` may read."""
  flax_settings = {name: getattr(flax.config, name) for name in dir(flax.config)
                   if name.startswith(("flax_", "nnx_"))}
  return {"sources": _source_stamps(),
          "versions": {name: importlib.metadata.version(name) for name in _VERSIONED},
          "python": sys.version, "jax_config": jax.config.values,
          "flax_config": {name: repr(value) for name, value in flax_settings.items()},
          "variables": {name: value for name, value in sorted(os.environ.items())
                        if name.startswith(_ENVIRONMENT_PREFIXES) and name != ENV},
          "devices": [(d.id, d.process_index, d.platform, d.device_kind, d.client.platform_version)
                      for d in devices],
          "processes": jax.process_count()}


def _signature(args) -> Dict[str, Any]:
  """The shapes, dtypes, shardings and tree structure of ``args``, as a key sees them."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return {"tree": str(treedef),
          "leaves": [(tuple(np.shape(x)), str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]}


def executable_path(description: Dict[str, Any], args, devices: Sequence[jax.Device]) -> Optional[pathlib.Path]:
  """Where ``KeptExecutable`` keeps a program of ``description`` for ``args``; None when it keeps none."""
  base = root()
  if base is None or jax.process_count() > 1:
    return None
  key = {"description": description, "arguments": _signature(args), "environment": environment(devices)}
  name = hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()
  return base / "executables" / machine_key() / f"{name}.bin"


class KeptExecutable:
  """``jitted`` compiled for its first arguments, kept on disk between processes; called like ``jitted``.

  The first call looks the executable up under a key of ``description``,
  the arguments' signature and ``environment()``; found, it runs without
  tracing or lowering ``jitted``; missing or unreadable, it compiles
  ``jitted`` as usual and keeps the result, unless JAX loaded it from its own
  cache (XLA:CPU serialises such a program again without its functions: it
  fails when run), so programs are kept when first compiled.
  ``description`` must name everything ``jitted`` computes that its sources do
  not (settings, shapes it closes over); it is JSON-encoded. Later calls must
  pass arguments like the first (a ``Compiled`` refuses others). With caching
  off, or several processes, it is ``jitted`` unchanged.
  """

  def __init__(self, jitted, description: Dict[str, Any], devices: Sequence[jax.Device]):
    self._jitted, self._description, self._devices = jitted, description, list(devices)
    self._compiled = None

  def __call__(self, *args):
    if self._compiled is None:
      self._compiled = self._load_or_compile(args)
    return self._compiled(*args)

  def _load_or_compile(self, args):
    path = executable_path(self._description, args, self._devices)
    if path is None:
      return self._jitted
    program = self._description.get("program", "a program")
    if path.exists():
      try:
        compiled = serialize_executable.deserialize_and_load(
            *pickle.loads(path.read_bytes()), execution_devices=self._devices)
        os.utime(path)  # Recently used: kept longest.
        logging.info("Loaded the kept executable of %s (%s).", program, path.name)
        return compiled
      except Exception as error:  # pylint: disable=broad-except  # Damaged or foreign: compile instead.
        logging.warning("Could not load the kept executable of %s from %s (%s: %s); compiling instead.",
                        program, path, type(error).__name__, (str(error).splitlines() or [""])[0])
    hits = _persistent_cache_hits()
    compiled = self._jitted.lower(*args).compile()
    if _persistent_cache_hits() != hits:
      # XLA:CPU serialises a program it loaded from JAX's cache without its functions
      # ("Function ... not found" when run): only one compiled here is kept.
      return compiled
    try:
      data = pickle.dumps(serialize_executable.serialize(compiled))
    except (ValueError, NotImplementedError) as error:  # A program JAX cannot serialise: not kept.
      logging.info("Not keeping the executable of %s: %s", program, error)
      return compiled
    _replace_file(path, data, f"the executable of {program}")
    _prune(path.parent, KEPT_EXECUTABLES)
    return compiled


_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_persistent_hits: Optional[int] = None  # Counted from the first _persistent_cache_hits() on.


def _count_hit(event: str, **unused_metadata) -> None:
  global _persistent_hits
  if event == _HIT_EVENT:
    _persistent_hits += 1


def _persistent_cache_hits() -> int:
  """How many programs JAX loaded from its persistent cache in this process (since first asked)."""
  global _persistent_hits
  if _persistent_hits is None:
    _persistent_hits = 0
    jax.monitoring.register_event_listener(_count_hit)
  return _persistent_hits


def _prune(folder: pathlib.Path, keep: int) -> None:
  """Deletes all but the ``keep`` most recently used executables of ``folder``."""
  try:
    kept = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in kept[keep:]:
      path.unlink(missing_ok=True)
  except OSError as error:  # Another process pruning at the same time, or a read-only folder.
    logging.info("Could not prune the kept executables in %s: %s", folder, error)
