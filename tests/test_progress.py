"""The loop's terminal output: one clean bar on a terminal with lines above it, plain lines in a log."""

import fcntl
import io
import logging as std_logging
import os
import pathlib
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from absl import logging
import pytest

from p2p_jax import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"\d+/\d+ \[")


def screen(output: str):
  """The lines a terminal shows for ``output``: a carriage return goes back to column 0 and overwrites."""
  lines, column = [[]], 0
  for char in _ANSI.sub("", output):
    if char == "\n":
      lines.append([])
      column = 0
    elif char == "\r":
      column = 0
    else:
      line = lines[-1]
      line.extend(" " * (column + 1 - len(line)))
      line[column] = char
      column += 1
  return ["".join(line).rstrip() for line in lines]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture
def terminal():
  """A terminal that absl's log lines go to, as they go to stderr in an absl program."""
  stream = _Terminal()
  handler = std_logging.StreamHandler(stream)
  logging.get_absl_logger().addHandler(handler)
  yield stream
  logging.get_absl_logger().removeHandler(handler)


def test_on_a_terminal_log_lines_and_metrics_go_above_the_bar(terminal):
  with progress.Progress(6, 0, stream=terminal) as bar:
    for step in range(1, 7):
      bar.update()
      logging.warning("a warning during step %d", step)
      if step % 2 == 0:
        bar.log(step, {"d_loss": 0.5, "g_l1": 0.25})
  lines = [line for line in screen(terminal.getvalue()) if line]
  assert all(not (_BAR.search(line) and ("warning" in line or "step " in line)) for line in lines), lines
  assert sum("a warning during step" in line for line in lines) == 6
  assert "step 4/6: d_loss=0.5, g_l1=0.25; " in "\n".join(lines)
  assert _BAR.search(lines[-1]) and "6/6" in lines[-1], "the bar stays, last, one line"


def test_not_on_a_terminal_each_log_step_is_one_line(caplog):
  log_file = io.StringIO()
  with caplog.at_level("INFO"):
    with progress.Progress(100, 10, stream=log_file) as bar:
      bar.update()
      assert bar.log(11, {"d_loss": 0.5}) is None  # No rate yet: the first interval held compiling.
      bar.update()
      time.sleep(0.01)
      rate = bar.log(12, {"d_loss": 0.25})
  assert log_file.getvalue() == "", "no bar"
  messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert messages[0] == "step 11/100: d_loss=0.5"
  assert re.fullmatch(r"step 12/100: d_loss=0.25; [\d.]+ steps/s, \d+:\d\d:\d\d left", messages[1])
  assert 0 < rate < 200


def test_processes_other_than_the_first_print_nothing(caplog):
  stream = _Terminal()
  with caplog.at_level("INFO"), progress.Progress(10, 0, enabled=False, stream=stream) as bar:
    bar.update()
    bar.log(1, {"d_loss": 0.5})
  assert stream.getvalue() == "" and not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_train_in_a_terminal_keeps_one_clean_bar(tmp_path, synthetic_dir):
  """experiments.train under a pseudo-terminal, stopped by SIGTERM: its warning too goes above the bar."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/demo.py",
             f"--workdir={tmp_path / 'run'}", f"--config.data_dir={synthetic_dir}", "--config.model.ngf=8",
             "--config.model.ndf=8", "--config.num_train_steps=100000", "--config.log_every_steps=2",
             "--config.sample_every_steps=3", "--config.checkpoint_every_steps=4"]
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave)
  os.close(slave)
  output, signalled, deadline = b"", False, time.monotonic() + 300
  while time.monotonic() < deadline:
    if not signalled and re.search(rb"step 8/100000", output):
      process.send_signal(signal.SIGTERM)
      signalled = True
    if select.select([master], [], [], 0.5)[0]:
      try:
        chunk = os.read(master, 65536)
      except OSError:  # The child exited and closed the terminal.
        break
      if not chunk:
        break
      output += chunk
  process.wait(timeout=60)
  os.close(master)
  text = output.decode("utf-8", "replace")
  assert process.returncode == 0, text[-3000:]
  lines = [line for line in screen(text) if line.strip()]
  cut = [line for line in lines if _BAR.search(line) and re.search(r"step \d+/|Got SIGTERM|Stopped by|[IWE]\d{4} \d\d:", line)]
  assert not cut, cut
  assert any(line.startswith("step 8/100000: d_fake=") for line in lines), lines[-20:]
  assert any("Got SIGTERM" in line for line in lines) and any("Stopped by SIGTERM" in line for line in lines)
  assert "Got images" not in text
