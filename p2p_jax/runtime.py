"""XLA:CPU process settings that p2p_jax applies itself when it is imported.

Two settings make a CPU training step faster and smaller (BENCHMARKS.md):

- Host memory. XLA:CPU gives each execution a fresh temporary buffer (171 MB
  for a 256 px pix2pix step). Dispatched asynchronously, that allocation
  happens on a worker thread, whose glibc arena takes such a block straight
  from mmap and hands it back to the kernel when freed; so every step first
  touches some 42,000 freshly zeroed pages again, about 13% of the step on a
  2-core machine. Running CPU computations inline on the calling thread and
  keeping freed blocks in the heap lets every step reuse the same pages.
- Copy insertion. With the state donated, XLA:CPU still copies every
  parameter and first Adam moment at the start of each step (0.4 GB at 256
  px) unless its region analysis proves the in-place updates safe.

Both must be in place before JAX starts its CPU backend, so ``import p2p_jax``
applies them (``configure``), whatever jits the step: the library's loop or a
user's own ``jax.jit``. They change nothing on other backends. Set
``P2P_JAX_CPU_TUNING=0`` in the environment to keep JAX's defaults.
``release_free_memory()`` hands back what compiling and initialising freed, so
that it does not count towards a run's peak memory.
"""

import ctypes
import ctypes.util
import os

from absl import logging
import jax

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap that glibc keeps rather than trims.
_TRIM_THRESHOLD_BYTES = 2 ** 31 - 1
OPT_OUT_VARIABLE = "P2P_JAX_CPU_TUNING"
# Compiler options for a donated train step (see the module docstring).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _libc():
  return ctypes.CDLL(ctypes.util.find_library("c"))


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def enabled() -> bool:
  """False when the user opted out with ``P2P_JAX_CPU_TUNING=0``."""
  return os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler_options() -> dict:
  """What the library's own jitted steps compile with: ``COMPILER_OPTIONS`` unless opted out."""
  return dict(COMPILER_OPTIONS) if enabled() else {}


def reuse_host_memory() -> bool:
  """Makes XLA:CPU executions reuse host memory between calls; True if fully applied.

  Must run before JAX's first computation: the CPU client reads the dispatch
  mode when it is created. Process-wide and harmless for other backends; on a
  C library other than glibc only the dispatch mode changes.
  """
  applied = True
  if _backends_initialized():
    logging.warning("reuse_host_memory() was called after JAX started its backends: CPU "
                    "computations stay asynchronous, and each step's buffers stay fresh pages.")
    applied = False
  else:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    mallopt = _libc().mallopt
  except AttributeError:  # Not glibc (musl, macOS): nothing to tune.
    return False
  # Large blocks from the heap rather than from mmap, and freed ones kept there.
  applied &= bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
  return applied


def _add_xla_flags(options: dict) -> None:
  """Appends ``options`` to XLA_FLAGS, unless the user set them; XLA reads it at backend start."""
  flags = os.environ.get("XLA_FLAGS", "")
  added = [f"--{name}={str(value).lower()}" for name, value in options.items() if f"--{name}" not in flags]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def configure() -> None:
  """Applies the CPU settings if JAX has not started yet and the user did not opt out.

  Called by ``import p2p_jax``. Once JAX runs, they cannot take effect: the
  library's own steps still compile with ``compiler_options()``, and this says
  (once, at INFO) that host memory stays as it is.
  """
  if not enabled():
    return
  if _backends_initialized():
    logging.info("p2p_jax was imported after JAX started its backends: its CPU host-memory "
                 "setting cannot apply (runtime.reuse_host_memory).")
    return
  _add_xla_flags(COMPILER_OPTIONS)
  reuse_host_memory()


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (glibc only; elsewhere a no-op).

  Worth calling after compiling (XLA leaves about 0.5 GB of freed heap), after
  initialising the state, and once after the first training step: that step's
  buffer lands in the holes compiling left, small allocations then settle in
  what remains of them, and from the second step on the buffer sits at the
  heap's top, where every later step reuses it.
  """
  try:
    _libc().malloc_trim(0)
  except AttributeError:
    pass
