"""Host-memory reuse, applied by ``import p2p_jax``: XLA:CPU's per-call buffer stops page-faulting afresh."""

import os
import statistics
import subprocess
import sys
import textwrap

import pytest

# A call whose temporary buffer (the optimisation barrier's 96 MiB output) is
# larger than a glibc thread arena can hold; prints the page faults of each of
# twelve calls. With the heap reused, glibc may still move the buffer to fresh
# pages once or twice before it settles (BENCHMARKS.md, "Host memory"), so the
# tests look at the median call.
_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    import p2p_jax  # Applies the host-memory setting, unless P2P_JAX_CPU_TUNING=0.
    print(not jax.config.read("jax_cpu_enable_async_dispatch"))
    x = jnp.ones((24, 1024, 1024))
    f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(x * 2.0)[::-1] * x))
    for _ in range(3):
      f(x).block_until_ready()
    for _ in range(12):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
_BUFFER_PAGES = 24 * 1024 * 1024 * 4 // 4096
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def _run(source: str, **env):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                        env=env, timeout=120, check=True)


def _probe(**env):
  """(whether CPU dispatch became synchronous, median page faults of a call)."""
  lines = _run(_PROBE, **env).stdout.split()
  return lines[0] == "True", statistics.median(float(n) for n in lines[-12:])


def test_importing_p2p_jax_stops_the_page_faults_of_each_call_unless_opted_out():
  applied, plain = _probe(P2P_JAX_CPU_TUNING="0")
  assert not applied and plain > 0.9 * _BUFFER_PAGES, "the probe sees every fresh page"
  applied, reused = _probe()
  assert applied and reused < 0.01 * _BUFFER_PAGES


def test_too_late_is_reported_not_silently_ignored():
  """Once the CPU client exists its dispatch mode is fixed: say so, change nothing there."""
  out = _run("import jax; jax.devices(); from p2p_jax import runtime; "
             "print(runtime.reuse_host_memory(), jax.config.read('jax_cpu_enable_async_dispatch'))",
             P2P_JAX_CPU_TUNING="0")
  assert out.stdout.split() == ["False", "True"]
  assert "called after JAX started its backends" in out.stderr
