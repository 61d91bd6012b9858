r"""Trains pix2pix: ``python -m experiments.train --config CONFIG --workdir DIR``.

Running the same command again resumes from the latest checkpoint in DIR.
Override any config key on the command line, e.g. ``--config.batch_size=4``.
Several hosts: pass --coordinator_address, --num_processes and --process_id on
every host (a Cloud TPU VM needs none of them).
"""

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from p2p_jax import checkpoint, input_pipeline, runtime, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/demo.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and samples go.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a run over several hosts.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a run over several hosts.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.mark_flags_as_required(["config", "workdir"])

_DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def initialize_distributed() -> None:
  """Connects the processes of a multi-host run; all three flags or none."""
  given = [name for name in _DISTRIBUTED_FLAGS if FLAGS[name].value is not None]
  if not given:
    return
  if len(given) < len(_DISTRIBUTED_FLAGS):
    missing = sorted(set(_DISTRIBUTED_FLAGS) - set(given))
    raise app.UsageError(f"--{', --'.join(given)} given without --{', --'.join(missing)}: "
                         "a multi-host run needs all three.")
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def parse_flags(argv):
  """absl's flag parser; an override of a key the config lacks is an error line, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:  # What ml_collections raises for such a key.
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    key, _, hint = str(error.args[0] if error.args else error).partition("\n")
    key = key.strip("'")
    given = [name for name in (arg.split("=")[0] for arg in argv if arg.startswith("--config."))
             if key in name.split(".")]
    sys.exit(f"error: {', '.join(given) or '--config.' + key}: the config has no key {key!r}. "
             f"{hint}".strip())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.reuse_host_memory()
  initialize_distributed()
  checkpoint.quiet_orbax_logs()
  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError, input_pipeline.DatasetUnavailableError,
          trainer.NonFiniteError) as error:  # OSError: e.g. a --workdir that cannot be written.
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
