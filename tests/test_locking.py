"""One run per workdir: refusal naming the holder, take-over of a dead one's lock, clean exit."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

from absl import logging
import pytest

from p2p_jax import locking


def _holder(workdir):
  """A process that holds ``workdir`` until its stdin closes (or it is killed)."""
  process = subprocess.Popen(
      [sys.executable, "-c", "import sys; from p2p_jax import locking\n"
       f"with locking.hold({str(workdir)!r}):\n  print('held', flush=True); sys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def test_a_workdir_held_by_another_process_is_refused_naming_the_holder(tmp_path):
  holder = _holder(tmp_path)
  try:
    recorded = json.loads((tmp_path / locking.LOCK_FILE).read_text())
    assert recorded["host"] == socket.gethostname() and recorded["pid"] == holder.pid
    with pytest.raises(locking.WorkdirInUseError, match=(
        rf"workdir={tmp_path} is in use by another training run \(host {socket.gethostname()}, pid "
        rf"{holder.pid}, since {re.escape(recorded['since'])}\): two runs on one workdir would mix their checkpoints")):
      with locking.hold(tmp_path):
        pass
  finally:
    holder.communicate("")
  assert not (tmp_path / locking.LOCK_FILE).exists()
  with locking.hold(tmp_path):  # Free again once the holder ended.
    pass


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
  holder = _holder(tmp_path)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  assert (tmp_path / locking.LOCK_FILE).exists()  # Left behind: nothing ran on the way out.
  with caplog.at_level(logging.WARNING):
    with locking.hold(tmp_path):
      assert json.loads((tmp_path / locking.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert f"left by a run that is no longer running (host {socket.gethostname()}, pid {holder.pid}" in caplog.text


def test_one_process_cannot_hold_a_workdir_twice(tmp_path):
  """POSIX locks belong to the process, so the kernel alone would let a second run in this one."""
  with locking.hold(tmp_path):
    with pytest.raises(locking.WorkdirInUseError, match=rf"pid {os.getpid()}: this process"):
      with locking.hold(tmp_path / "."):
        pass


def test_a_run_leaves_a_workdir_it_created_only_if_it_wrote_into_it(tmp_path):
  with locking.hold(tmp_path / "a" / "b"):
    assert (tmp_path / "a" / "b" / locking.LOCK_FILE).exists()
  assert not (tmp_path / "a").exists()
  with locking.hold(tmp_path / "kept"):
    (tmp_path / "kept" / "checkpoints").mkdir()
  assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["checkpoints"]


def test_a_bucket_takes_no_lock_and_says_so(caplog):
  with caplog.at_level(logging.WARNING):
    with locking.hold("gs://bucket/run"):
      pass
  assert "has no file locks, so nothing stops a second run" in caplog.text
