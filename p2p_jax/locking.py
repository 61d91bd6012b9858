"""One training run per workdir: a lock file that names its holder.

Two runs writing one workdir would interleave their checkpoints, and each
run's ``keep_checkpoints`` would delete the other's. A run therefore holds
``<workdir>/run.lock`` while it trains: a POSIX record lock (``lockf``), which
the kernel releases when the process dies however it dies, and which NFS and
other shared file systems honour (through their lock manager). The file says
who holds it (host, pid, since when), so a refused run can name the holder; a
file whose lock is free was left by a process that died, and is taken over
with a warning.

The processes of a multi-host run are one holder: process 0 takes the lock and
tells the others whether it got it. Cloud Storage (``gs://``) has no locks: a
run there takes none, and says so.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
from typing import Iterator, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_FILE = "run.lock"
_HELD = set()  # Workdirs this process holds: lockf does not refuse a process its own lock.
_HELD_GUARD = threading.Lock()


class WorkdirInUseError(OSError):
  """Another live run holds the workdir."""


def _holder_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
    return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"


def _refused(workdir, holder: str) -> WorkdirInUseError:
  return WorkdirInUseError(
      f"workdir={workdir} is in use by another training run ({holder}): two runs on one "
      "workdir would mix their checkpoints. Wait for it to end, stop it, or give this run another "
      "workdir.")


def _lock(workdir: str) -> int:
  """Opens and locks ``<workdir>/run.lock``; its descriptor. Refuses with the holder's name."""
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno in (errno.EACCES, errno.EAGAIN):
        raise _refused(workdir, _holder_text(path)) from None
      raise
    try:  # The holder before us may have removed the file between our open and our lock.
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)


def _claim(fd: int, workdir: str) -> None:
  """Writes this process's name into the locked file, after warning about a dead holder's."""
  left = os.read(fd, 4096)
  if left.strip():
    logging.warning("Took over the lock of workdir %s left by a run that is no longer running (%s).",
                    workdir, _holder_text(os.path.join(workdir, LOCK_FILE)))
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "processes": jax.process_count()}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
  os.fsync(fd)


def _created_dirs(workdir: str) -> list:
  """The folders ``makedirs(workdir)`` is about to create, innermost first."""
  created, path = [], workdir
  while not os.path.exists(path):
    created.append(path)
    path = os.path.dirname(path)
  return created


@contextlib.contextmanager
def hold(workdir: epath.Path) -> Iterator[None]:
  """Holds ``workdir`` for one run (all its processes); a WorkdirInUseError if a live run has it.

  On exit the lock file goes, and so do the folders taking it created, if
  nothing else was written into them: a run refused after this leaves the
  workdir as it found it.
  """
  if "://" in str(workdir):
    logging.warning("%s is not a local or mounted file system: it has no file locks, so nothing "
                    "stops a second run from writing the same workdir at the same time.", workdir)
    yield
    return
  workdir = os.path.realpath(os.fspath(workdir))
  fd: Optional[int] = None
  created = []
  problem = None
  if jax.process_index() == 0:
    try:
      with _HELD_GUARD:
        if workdir in _HELD:
          raise _refused(workdir, f"host {socket.gethostname()}, pid {os.getpid()}: this process")
        created = _created_dirs(workdir)
        os.makedirs(workdir, exist_ok=True)
        fd = _lock(workdir)
        _claim(fd, workdir)
        _HELD.add(workdir)
    except OSError as error:
      problem = error
      if fd is not None:
        os.close(fd)
        fd = None
      for folder in created:
        with contextlib.suppress(OSError):
          os.rmdir(folder)
  if jax.process_count() > 1:  # One holder: the others go by process 0's answer.
    refused = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
    if refused and problem is None:
      problem = WorkdirInUseError(f"workdir={workdir}: process 0 could not take the "
                                  "workdir's lock (it says why).")
  if problem is not None:
    raise problem
  try:
    yield
  finally:
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(workdir, LOCK_FILE))  # While still locked: the next run makes a new one.
      os.close(fd)
      with _HELD_GUARD:
        _HELD.discard(workdir)
      for folder in created:
        with contextlib.suppress(OSError):
          os.rmdir(folder)  # Only if empty: a run that wrote something keeps its workdir.
