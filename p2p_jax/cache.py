"""Local caches that make a run's second start fast: compiled programs and image scans.

Both live under ``root()``: ``$P2P_JAX_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/p2p_jax`` (``~/.cache/p2p_jax``), where the synthetic
dataset is kept too. ``P2P_JAX_CACHE_DIR=off`` keeps neither.

- Compiled programs: JAX's persistent compilation cache, in
  ``xla/<machine>/``, one folder per CPU model and instruction set, so that a
  home folder shared by different machines never hands one CPU code compiled
  for another. ``import p2p_jax`` turns it on (``enable_compilation_cache``)
  unless JAX's own setting (``jax_compilation_cache_dir``,
  ``$JAX_COMPILATION_CACHE_DIR``) names a folder already. JAX keys each entry
  by the program, its options, the XLA flags and the JAX version.
- Image scans: ``scans/<folder>.json`` records what each file of a folder
  holds (``images.ImageInfo``) with the file's size, modification and change
  times and inode when it was decoded. A file whose record matches is not
  decoded again; any other is, so a file replaced or damaged since is still
  named before a run starts. Only files that decoded are recorded.

The cache is trusted as the code is (JAX's compiled programs run as they are
loaded): keep it where only you can write.
"""

import hashlib
import json
import os
import pathlib
import platform
import re
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from absl import logging
import jax

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
  if _writable_folder(path.parent, what) is None:
    return
  staged = None
  try:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
      staged = file.name
      json.dump(data, file)
    os.replace(staged, path)
  except OSError as error:
    logging.warning("Could not record %s in %s: %s", what, path, error)
    if staged is not None:
      pathlib.Path(staged).unlink(missing_ok=True)
