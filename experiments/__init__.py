"""Command-line entry points: ``python -m experiments.<train|evaluate|translate|export|benchmark>``.

A start imports JAX, TensorFlow and the rest, some 700,000 Python objects that
the cyclic garbage collector would go through again and again, during the
imports and during every trace of the networks after them. So while Python
looks up the module to run (``python -m``: it imports this package first), the
collector is held off; ``run`` freezes what was imported (``gc.freeze``: later
collections skip it) and turns the collector back on. About 1.5 s of each
start on a 2-core CPU (BENCHMARKS.md).
"""

import gc
import sys

from absl import app

if sys.argv[:1] == ["-m"]:  # `python -m experiments.<module>`: that module's imports follow.
  gc.disable()


def run(main, **kwargs) -> None:
  """``absl.app.run(main, **kwargs)``, after freezing what was imported and turning the collector on."""
  gc.freeze()
  gc.enable()
  app.run(main, **kwargs)
