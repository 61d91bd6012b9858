"""Process set-up that keeps XLA:CPU from page-faulting its way through every step.

XLA:CPU gives each execution a fresh temporary buffer (171 MB for a 256 px
pix2pix step). Dispatched asynchronously, that allocation happens on a worker
thread, whose glibc arena takes such a block straight from mmap and hands it
back to the kernel when freed; so every step first-touches some 42,000
freshly zeroed pages again, which on a 2-core machine cost about 13% of the
step (BENCHMARKS.md). Running CPU computations inline on the calling thread
and keeping freed blocks in the heap lets every step reuse the same pages.

``experiments.train`` and ``experiments.benchmark`` call ``reuse_host_memory()``
first thing; a script of your own that trains on a CPU should do the same.
``release_free_memory()`` then hands back what compiling and initialising
freed, so that it does not count towards the run's peak memory.
"""

import ctypes
import ctypes.util

from absl import logging
import jax

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap that glibc keeps rather than trims.
_TRIM_THRESHOLD_BYTES = 2 ** 31 - 1


def _libc():
  return ctypes.CDLL(ctypes.util.find_library("c"))


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def reuse_host_memory() -> bool:
  """Makes XLA:CPU executions reuse host memory between calls; True if fully applied.

  Call it before JAX's first computation: the CPU client reads the dispatch
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
