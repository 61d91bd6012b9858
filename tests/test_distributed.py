"""Scale-out: the same run on 1 x 4, 2 x 2 and 1 x 1 devices, one cooperative checkpoint, clear errors.

Each run is ``python -m experiments.train`` on the demo config (64 px, so that
the U-Net's dropout is active) with 8 instead of 32 base channels, started from
this checkout (cwd and PYTHONPATH) with its own number of fake CPU devices; two
processes talk over localhost. The runs are shared by the tests of this module:
a 2-process run and a 1-process run of the same steps, and a chain that resumes
the 2-process run's checkpoint on 1 device, then that run's checkpoint on 4.

The learning rate is 1e-6. Adam divides each gradient element by its own
magnitude, so float summation-order noise in elements near its epsilon (1e-8)
moves a parameter by up to the learning rate per step: at the paper's 2e-4
that noise alone reaches 1.5e-5 in six steps, as much between 1 and 4 devices
of one process as between hosts. The optimizer's moments are plain gradient
averages, so one misplaced example, crop or dropout mask still shows in the
compared state (at 0.2 when the hosts' slices are swapped).
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

from absl import app
from etils import epath
import jax
import numpy as np
import pytest

from experiments import train as train_entry
from p2p_jax import checkpoint, summaries, trainer
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # Checkpoints after steps 2, 4 and 6.
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_command(workdir, data_dir, *flags):
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/demo.py",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.model.ngf=8",
          "--config.model.ndf=8", "--config.optim.lr=1e-6", "--config.batch_size=4",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=2",
          "--config.sample_every_steps=2", "--config.log_every_steps=1", *flags]


def _two_processes(command, second_process_flags=()):
  """The command for each of two processes on localhost."""
  address = f"127.0.0.1:{_free_port()}"
  return [command + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
          + (list(second_process_flags) if i else []) for i in range(2)]


def _run(commands, devices: int, logs: pathlib.Path, timeout: float = TIMEOUT_S, cache=None):
  """Runs the commands together, each with ``devices`` fake CPU devices; returns (codes, outputs).

  Whatever outlives ``timeout``, or 30 s after another process failed, is killed.
  ``cache``: a folder for compiled programs shared by runs on the same devices.
  """
  # No JAX_CPU_COLLECTIVES_IMPLEMENTATION: the entry point must choose gloo itself.
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  logs.mkdir(parents=True, exist_ok=True)
  files = [open(logs / f"process_{i}.log", "w+") for i in range(len(commands))]
  processes = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
               for c, f in zip(commands, files)]
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
      if any(p.poll() not in (None, 0) for p in processes):
        deadline = min(deadline, time.monotonic() + 30)
      time.sleep(0.2)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for f in files:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  return [p.returncode for p in processes], outputs


def _train(commands, devices, logs):
  codes, outputs = _run(commands, devices, logs, cache=logs.parent / "compilation_cache")
  for code, output in zip(codes, outputs):
    assert code == 0, f"exit code {code}:\n{output[-6000:]}"
  return outputs


def _copy_checkpoint(source_workdir, step, workdir) -> None:
  shutil.copytree(checkpoint.checkpoint_dir(source_workdir) / str(step),
                  checkpoint.checkpoint_dir(workdir) / str(step))


def _assert_same_state(workdir, reference, atol=1e-5):
  """Every array of the final TrainStates (parameters, batch statistics, Adam moments) within atol."""
  state, expected = checkpoint.load_state(workdir), checkpoint.load_state(reference)
  assert int(state.step) == int(expected.step) == STEPS
  np.testing.assert_array_equal(state.rng, expected.rng)
  differences = jax.tree_util.tree_flatten_with_path(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0)), state, expected))[0]
  worst = sorted(((d, jax.tree_util.keystr(path)) for path, d in differences), reverse=True)[:5]
  assert worst[0][0] <= atol, f"largest differences: {worst}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("runs")
  data_dir = base / "data"  # Empty: both processes of the first run generate the dataset at once.
  command = lambda name, *flags: _train_command(base / name, data_dir, *flags)
  outputs = _train(_two_processes(command("2x2", "--initialization_timeout=120")), 2, base / "logs_2x2")
  _train([command("1x4")], 4, base / "logs_1x4")
  _copy_checkpoint(base / "2x2", 2, base / "4to1")
  _train([command("4to1")], 1, base / "logs_4to1")
  _copy_checkpoint(base / "4to1", 4, base / "1to4")
  _train([command("1to4")], 4, base / "logs_1to4")
  return base, outputs


def test_two_processes_of_two_devices_equal_one_process_of_four(runs):
  """Global batches, jitter and dropout masks depend on the seed and the global position only."""
  base, outputs = runs
  _assert_same_state(base / "2x2", base / "1x4")
  for output in outputs:
    assert "Training steps 0 to 6 (64 per epoch) on 4 device(s) in 2 process(es)" in output
  synthetic = [p.name for p in (base / "data").iterdir()]
  assert len(synthetic) == 1 and synthetic[0].startswith("synthetic-"), synthetic


def test_the_two_processes_write_one_checkpoint_and_one_set_of_summaries(runs):
  base, _ = runs
  checkpoints = checkpoint.checkpoint_dir(base / "2x2")
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6"]
  state_dir = checkpoints / "6" / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
  assert checkpoint.load_config(base / "2x2").num_train_steps == STEPS
  # Read on one device by the single-process loader (compared in the test above).
  assert checkpoint.load_state(base / "2x2").g_params["up_0"]["kernel"].sharding.device_set == {
      jax.local_devices()[0]}
  assert len(list((base / "2x2").glob("events.out.tfevents.*"))) == 1
  assert sorted(p.name for p in (base / "2x2" / "samples").iterdir()) == [
      "index.html", "step_00000002.png", "step_00000004.png", "step_00000006.png"]


def test_resuming_on_another_device_count_continues_the_same_run(runs):
  """The 2-process checkpoint of step 2 resumed on 1 device, its step 4 resumed on 4."""
  base, _ = runs
  assert sorted(p.name for p in checkpoint.checkpoint_dir(base / "4to1").iterdir()) == ["2", "4", "6"]
  _assert_same_state(base / "4to1", base / "1x4")
  _assert_same_state(base / "1to4", base / "1x4")


def test_processes_started_with_different_commands_stop_with_a_message(tmp_path):
  command = _train_command(tmp_path / "work", tmp_path / "data")
  codes, outputs = _run(_two_processes(command, ["--num_processes=3", "--config.seed=1"]), 2,
                        tmp_path / "logs", timeout=120)
  for code, output in zip(codes, outputs):
    assert code != 0, output[-3000:]
    assert ("Every process must run the same command: --num_processes differs (2 on process 0, "
            "3 on process 1; process 0 started 2); the config of process(es) [1] differs from "
            "process 0's") in output, output[-3000:]
  assert not (tmp_path / "data").exists(), "stopped before reading any data"


def test_an_unreachable_coordinator_is_named(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  command = _train_command(tmp_path / "work", tmp_path / "data", f"--coordinator_address={address}",
                           "--num_processes=2", "--process_id=1", "--initialization_timeout=2")
  start = time.monotonic()
  (code,), (output,) = _run([command], 1, tmp_path / "logs", timeout=120)
  assert code == 1, output[-3000:]
  assert (f"error: No coordinator answered at --coordinator_address={address} within "
          "--initialization_timeout=2 s") in output, output[-3000:]
  assert time.monotonic() - start < 60


@pytest.mark.parametrize("values, message", [
    (("127.0.0.1:1234", 2, None), r"--coordinator_address, --num_processes given without --process_id"),
    (("127.0.0.1:1234", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (("127.0.0.1", 2, 0), r"--coordinator_address=127.0.0.1 must be host:port"),
])
def test_distributed_flags_are_checked_before_connecting(values, message, monkeypatch):
  monkeypatch.setattr(jax.distributed, "initialize", pytest.fail)
  with pytest.raises(app.UsageError, match=message):
    train_entry.initialize_distributed(*values, timeout=1)


def test_cpu_processes_get_gloo_collectives_and_tpu_vms_find_their_workers(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  before = jax.config.jax_cpu_collectives_implementation
  try:
    jax.config.update("jax_cpu_collectives_implementation", None)  # Older JAX's default.
    train_entry.initialize_distributed("127.0.0.1:1234", 2, 0, timeout=7)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
  finally:
    jax.config.update("jax_cpu_collectives_implementation", before)
  assert calls.pop() == (("127.0.0.1:1234", 2, 0), {"initialization_timeout": 7})
  train_entry.initialize_distributed(None, None, None, timeout=7)
  assert not calls, "no flags and no TPU: one process, nothing to join"
  monkeypatch.setattr(train_entry, "_on_cloud_tpu", lambda: True)
  train_entry.initialize_distributed(None, None, None, timeout=7)
  assert calls.pop() == ((), {"initialization_timeout": 7})


def test_a_batch_that_does_not_split_over_the_devices_is_named_before_reading_data(tmp_path):
  config = tiny_config()
  config.batch_size, config.data_dir = 6, str(tmp_path / "data")
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be a positive multiple of the "
                                       r"number of devices, 4 \(1 process\(es\) x 4 local device"):
    trainer.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "data").exists() and not (tmp_path / "work").exists()


def test_a_bucket_workdir_stays_a_url(tmp_path, monkeypatch):
  """The hosts of a pod slice share a gs:// workdir: pathlib would make it a local folder "gs:"."""
  assert str(checkpoint.checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
  assert checkpoint.workdir_path("run") == epath.Path(os.getcwd()) / "run"
  # gs:// into tmp_path (mock_epath's backend is bypassed where TensorFlow is installed).
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
  in_tmp = lambda fn, path, *args, **kwargs: fn(str(path).replace("gs://", f"{tmp_path}/"), *args, **kwargs)
  with epath.testing.mock_epath(open=in_tmp, makedirs=in_tmp, mkdir=in_tmp, exists=in_tmp,
                                isdir=in_tmp, listdir=in_tmp, glob=in_tmp, stat=in_tmp):
    summaries.write_samples("gs://bucket/run/samples", 3, np.zeros((8, 32, 3), np.uint8))
  written = tmp_path / "bucket" / "run" / "samples"
  assert sorted(p.name for p in written.iterdir()) == ["index.html", "step_00000003.png"]
  assert not pathlib.Path("gs:").exists()
