"""reuse_host_memory: XLA:CPU's per-call temporary buffer stops page-faulting afresh."""

import os
import subprocess
import sys
import textwrap

import pytest

# A call whose temporary buffer (the optimisation barrier's 96 MiB output) is
# larger than a glibc thread arena can hold; prints the page faults of one call.
_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    from p2p_jax import runtime
    if sys.argv[1] == "late":
      jax.devices()
    if sys.argv[1] != "plain":
      print(runtime.reuse_host_memory())
    x = jnp.ones((24, 1024, 1024))
    f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(x * 2.0)[::-1] * x))
    for _ in range(3):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
""")
_BUFFER_PAGES = 24 * 1024 * 1024 * 4 // 4096
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def _probe(mode: str):
  """(what reuse_host_memory returned or None, faults per call, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       env=env, timeout=120, check=True)
  lines = out.stdout.split()
  return (lines[0] == "True" if len(lines) > 1 else None), float(lines[-1]), out.stderr


def test_reusing_host_memory_stops_the_page_faults_of_each_call():
  _, plain, _ = _probe("plain")
  assert plain > 0.9 * _BUFFER_PAGES, "the probe sees every fresh page"
  applied, reused, _ = _probe("reuse")
  assert applied and reused < 0.01 * _BUFFER_PAGES


def test_too_late_is_reported_not_silently_ignored():
  applied, faults, stderr = _probe("late")
  assert applied is False
  assert "called after JAX started its backends" in stderr
  assert faults > 0.9 * _BUFFER_PAGES
