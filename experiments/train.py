r"""Trains pix2pix: ``python -m experiments.train --config CONFIG --workdir DIR``.

Running the same command again resumes from the latest checkpoint in DIR.
Override any config key on the command line, e.g. ``--config.batch_size=4``.
Several hosts: run the same command on every host, one process each using all
its devices, adding --coordinator_address (host:port of process 0),
--num_processes and --process_id; on Cloud TPU VMs JAX finds the slice's
workers itself and none of the three is needed. DIR must be one folder that
every process sees (a shared file system or a gs:// bucket): they write each
checkpoint together.
"""

import hashlib
import importlib.util
import socket
import sys
import time

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

import experiments
from experiments import cli
from p2p_jax import checkpoint, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/demo.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and samples go.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a run over several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a run over several processes.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Seconds to wait for process 0 and for all processes to connect.")
flags.mark_flags_as_required(["config", "workdir"])

_DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")
# Where the data lives on each host may differ between processes; the rest of the config may not.
_HOST_LOCAL_KEYS = ("data_dir", "cache")


def _on_cloud_tpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _wait_for_coordinator(address: str, timeout: int) -> None:
  """Waits until process 0 listens at ``address``; a clear error after ``timeout`` seconds.

  JAX itself would abort the process with a message about a dead task.
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
      return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise ConnectionError(
            f"No coordinator answered at --coordinator_address={address} within "
            f"--initialization_timeout={timeout} s ({error}). Start process 0 with the same "
            "--coordinator_address, its own host's address, and make sure this host can reach "
            "that port.") from None
      time.sleep(0.5)


def initialize_distributed(coordinator_address, num_processes, process_id, timeout: int) -> None:
  """Connects the processes of a run over several processes; all three values or none.

  Must run before anything starts a JAX backend. On CPU, processes exchange
  data through gloo (older JAX has no CPU collectives unless asked).
  """
  values = dict(zip(_DISTRIBUTED_FLAGS, (coordinator_address, num_processes, process_id)))
  given = [name for name, value in values.items() if value is not None]
  if not given:
    if _on_cloud_tpu():
      try:  # JAX finds the workers of the TPU slice (just this one on a one-host TPU VM).
        jax.distributed.initialize(initialization_timeout=timeout)
      except ValueError as error:  # libtpu installed, but no TPU VM around.
        logging.warning("libtpu is installed but JAX found no TPU VM to join (%s); running as "
                        "one process.", error)
    return
  if len(given) < len(_DISTRIBUTED_FLAGS):
    missing = [name for name in _DISTRIBUTED_FLAGS if name not in given]
    raise app.UsageError(f"--{', --'.join(given)} given without --{', --'.join(missing)}: "
                         "a run over several processes needs all three.")
  if not coordinator_address.rpartition(":")[2].isdigit():
    raise app.UsageError(f"--coordinator_address={coordinator_address} must be host:port.")
  if not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if process_id != 0:
    _wait_for_coordinator(coordinator_address, timeout)
  logging.info("Process %d of %d: connecting to the coordinator at %s; waiting up to %d s for all "
               "processes (--initialization_timeout).", process_id, num_processes,
               coordinator_address, timeout)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout)


def _fingerprint(config: ml_collections.ConfigDict) -> np.ndarray:
  shared = config.to_dict()
  for key in _HOST_LOCAL_KEYS:
    shared.pop(key, None)
  digest = hashlib.sha256(ml_collections.ConfigDict(shared).to_json(sort_keys=True).encode())
  return np.frombuffer(digest.digest()[:8], np.int32)


def check_processes_agree(config: ml_collections.ConfigDict, num_processes) -> None:
  """All processes must run one command: JAX goes by process 0's --num_processes, and
  processes with different configs would train on different batches or deadlock."""
  if jax.process_count() == 1:
    return
  claimed = jax.process_count() if num_processes is None else num_processes
  mine = np.concatenate([[claimed], _fingerprint(config)]).astype(np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine))
  problems = []
  if np.any(every[:, 0] != jax.process_count()):
    said = ", ".join(f"{n} on process {i}" for i, n in enumerate(every[:, 0]))
    problems.append(f"--num_processes differs ({said}; process 0 started {jax.process_count()})")
  differing = [i for i in range(len(every)) if np.any(every[i, 1:] != every[0, 1:])]
  if differing:
    problems.append(f"the config of process(es) {differing} differs from process 0's (only "
                    f"{', '.join('config.' + k for k in _HOST_LOCAL_KEYS)} may differ)")
  if problems:
    raise app.UsageError("Every process must run the same command: " + "; ".join(problems) + ".")


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
  try:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.initialization_timeout)
  except ConnectionError as error:
    sys.exit(f"error: {error}")
  check_processes_agree(FLAGS.config, FLAGS.num_processes)
  checkpoint.quiet_orbax_logs()
  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, keep_executables=True)
  except cli.USER_ERRORS as error:  # OSError: e.g. a --workdir that cannot be written.
    cli.exit_with(error, {"workdir": "--workdir"})


if __name__ == "__main__":
  experiments.run(main, flags_parser=parse_flags)
