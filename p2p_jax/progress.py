"""What the training loop prints: a progress bar on a terminal, one line per log step otherwise.

On a terminal the bar stays one line at the bottom: the loop's metric lines,
and every log line written while the bar is shown, are printed above it. In a
log file (or any output that is not a terminal) there is no bar, and each log
step is one line: the step, the metrics, the rate and the time left.
"""

import contextlib
import datetime
import io
import logging as std_logging
import sys
import time
from typing import Dict, Iterator, List, Optional, TextIO

from absl import logging
import tqdm

_LOSS_POSTFIX = ("d_loss", "g_gan", "g_l1")


def metric_line(step: int, total: int, scalars: Dict[str, float], rate: Optional[float]) -> str:
  """``step 40/1000: d_fake=0.6931, ...; 2.51 steps/s, 0:06:22 left``."""
  values = ", ".join(f"{name}={value:.4g}" for name, value in sorted(scalars.items()))
  line = f"step {step}/{total}: {values}"
  if rate:
    left = datetime.timedelta(seconds=round((total - step) / rate))
    line += f"; {rate:.3g} steps/s, {left} left"
  return line


class _AboveTheBar(io.TextIOBase):
  """A stream that prints each write above the bar (``tqdm.write``), not through it."""

  def __init__(self, bar: tqdm.tqdm):
    super().__init__()
    self._bar = bar

  def write(self, text: str) -> int:
    if text.strip():
      tqdm.tqdm.write(text.rstrip("\n"), file=self._bar.fp)
    return len(text)

  def flush(self) -> None:
    self._bar.fp.flush()


class Progress:
  """The loop's terminal output from ``initial`` to ``total`` steps; a context manager.

  ``enabled=False`` (processes other than the first) prints nothing.
  """

  def __init__(self, total: int, initial: int, *, enabled: bool = True, stream: Optional[TextIO] = None):
    self.total, self.enabled = total, enabled
    self._stream = stream or sys.stderr
    self._last_time, self._last_step = None, initial  # The first interval would count compiling.
    self._bar = None
    if enabled and self._stream.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self._stream)

  def _handlers_on_this_stream(self) -> List[std_logging.StreamHandler]:
    """The log handlers (absl's, and any on the root or absl logger) that write where the bar is."""
    loggers = (std_logging.getLogger(), logging.get_absl_logger())
    candidates = [logging.get_absl_handler(), *(h for lg in loggers for h in lg.handlers)]
    candidates += [getattr(h, "python_handler", None) for h in list(candidates)]  # absl wraps one
    return [h for h in dict.fromkeys(candidates)
            if isinstance(h, std_logging.StreamHandler) and h.stream is self._stream]

  @contextlib.contextmanager
  def _log_lines_above_the_bar(self) -> Iterator[None]:
    handlers = self._handlers_on_this_stream() if self._bar is not None else []
    for handler in handlers:
      handler.stream = _AboveTheBar(self._bar)
    try:
      yield
    finally:
      for handler in handlers:
        handler.stream = self._stream

  def __enter__(self) -> "Progress":
    self._redirect = self._log_lines_above_the_bar()
    self._redirect.__enter__()
    return self

  def __exit__(self, *exc_info) -> None:
    self._redirect.__exit__(*exc_info)
    if self._bar is not None:
      self._bar.close()

  def update(self) -> None:
    """One step done."""
    if self._bar is not None:
      self._bar.update()

  def log(self, step: int, scalars: Dict[str, float]) -> Optional[float]:
    """Prints the metrics of ``step``; returns the steps per second since the last call (None at first)."""
    now = time.perf_counter()
    rate = None
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) / (now - self._last_time)
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return rate
    line = metric_line(step, self.total, scalars, rate)
    if self._bar is None:
      logging.info("%s", line)
    else:
      self._bar.set_postfix({name: f"{scalars[name]:.3g}" for name in _LOSS_POSTFIX if name in scalars},
                            refresh=False)
      tqdm.tqdm.write(line, file=self._stream)
    return rate
