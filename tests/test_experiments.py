"""The entry points as users run them (subprocesses), and the presets in experiments/configs."""

import gc
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
from ml_collections import config_flags
import pytest

from p2p_jax import checkpoint, configuration, input_pipeline, recipe, trainer
from tests.conftest import assert_states_equal, checkpoint_steps, run_config, snapshot

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "experiments" / "configs"
# The paper's appendix (section 6.3): dataset, direction, epochs, batch size.
PAPER_PRESETS = {
    "facades.py": ("pix2pix/facades", "BtoA", 200, 1),
    "cityscapes.py": ("pix2pix/cityscapes", "BtoA", 200, 1),
    "maps.py:AtoB": ("pix2pix/maps", "AtoB", 200, 1),
    "maps.py:BtoA": ("pix2pix/maps", "BtoA", 200, 1),
    "edges2.py:shoes": ("pix2pix/edges2shoes", "AtoB", 15, 4),
    "edges2.py:handbags": ("pix2pix/edges2handbags", "AtoB", 15, 4),
    "night2day.py": ("pix2pix/night2day", "BtoA", 17, 4),  # day -> night: B is the day photo
}


# Keys the issue fixes, which scripts and overrides may rely on.
FIXED_KEYS = {"dataset", "train_split", "eval_split", "direction", "load_size", "crop_size",
              "batch_size", "seed", "num_epochs", "num_train_steps", "log_every_steps",
              "checkpoint_every_steps", "sample_every_steps", "keep_checkpoints"}
GROUPS = ("model", "loss", "optim")


def _command(module, *args):
  return [sys.executable, "-m", f"experiments.{module}", *map(str, args)]


def _train_command(config, workdir, *extra):
  """experiments.train: the default preset, and --config.KEY=VALUE for each key ``config`` changes."""
  defaults = configuration.flatten(configuration.default_config())
  overrides = [f"--config.{key}={value}" for key, value in configuration.flatten(config).items()
               if value != defaults[key]]
  return _command("train", "--config", CONFIGS / "default.py", *overrides, "--workdir", workdir,
                  *extra)


def _load_preset(name):
  """The preset as experiments.train loads it (``file.py:argument`` included)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
  flag_values(["train", f"--config={CONFIGS / name}"])
  return flag_values.config


@pytest.fixture(scope="module")
def failed_commands(finished_run, tmp_path_factory):
  """Entry points given bad arguments, all started at once; .results: {name: (returncode, stderr)}."""
  config, workdir = finished_run
  tmp = tmp_path_factory.mktemp("cli")
  copy = tmp / "copy"
  shutil.copytree(checkpoint.checkpoint_dir(workdir), checkpoint.checkpoint_dir(copy))
  other = config.copy_and_resolve_references()
  other.model.ngf = 16
  damaged = {}
  for name in ("truncated", "overwritten"):  # Step 5 damaged in place, step 4 intact.
    damaged[name] = tmp / name
    shutil.copytree(checkpoint.checkpoint_dir(workdir), checkpoint.checkpoint_dir(damaged[name]))
    state_files = [p for p in (damaged[name] / "checkpoints" / "5" / "state").rglob("*") if p.is_file()]
    largest = max(state_files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    if name == "truncated":
      del data[len(data) // 2:]
    else:
      data[len(data) // 3:len(data) // 3 + 4096] = np.random.default_rng(0).bytes(4096)
    largest.write_bytes(bytes(data))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "photo.png")
  commands = {
      "incompatible": _train_command(other, copy),
      "multihost": _train_command(config, tmp / "new", "--coordinator_address=localhost:1234"),
      "typo": _train_command(config, tmp / "new", "--config.model.ngff=16"),
      "translate": _command("translate", "--workdir", workdir, "--input", tmp / "missing.png",
                            "--output", tmp / "out"),
      "evaluate": _command("evaluate", "--workdir", workdir, "--step", 3),
      "split": _command("evaluate", "--workdir", workdir, "--split", "nosuchsplit"),
      "all_and_step": _command("evaluate", "--workdir", workdir, "--all_checkpoints", "--step", 4),
      "gan_mode": _train_command(config, tmp / "wgan", "--config.loss.gan_mode=wgan"),
      "damaged_translate": _command("translate", "--workdir", damaged["truncated"], "--input",
                                    tmp / "photo.png", "--output", tmp / "out"),
      "damaged_evaluate": _command("evaluate", "--workdir", damaged["overwritten"]),
  }
  before = snapshot(copy)
  processes = {name: subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
               for name, command in commands.items()}
  results = {}
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    results[name] = process.returncode, stderr
  return types.SimpleNamespace(results=results, tmp=tmp, before=before)


def _error_line(failed_commands, name):
  returncode, stderr = failed_commands.results[name]
  assert returncode != 0, stderr
  assert "Traceback" not in stderr, stderr
  return stderr


def test_train_refuses_an_incompatible_workdir_and_leaves_it_untouched(failed_commands):
  stderr = _error_line(failed_commands, "incompatible")
  copy = failed_commands.tmp / "copy"
  assert (f"error: --workdir={copy} holds a checkpoint of a different run (--config.model.ngf: "
          "8 in the checkpoint, 16 now). It was left untouched") in stderr
  assert snapshot(copy) == failed_commands.before


def test_train_wants_all_three_multi_host_flags_or_none(failed_commands):
  stderr = _error_line(failed_commands, "multihost")
  assert ("--coordinator_address given without --num_processes, --process_id: a run over several "
          "processes needs all three.") in stderr
  assert not (failed_commands.tmp / "new").exists()


def test_train_names_a_config_override_of_no_key(failed_commands):
  stderr = _error_line(failed_commands, "typo")
  assert ('error: --config.model.ngff: the config has no key \'ngff\'. Did you mean "ngf" instead '
          'of "ngff"?') in stderr
  assert not (failed_commands.tmp / "new").exists()


def test_translate_names_a_missing_input(failed_commands):
  stderr = _error_line(failed_commands, "translate")
  assert f"error: --input={failed_commands.tmp / 'missing.png'}: no such file or folder." in stderr


def test_evaluate_names_a_step_without_checkpoint(finished_run, failed_commands):
  stderr = _error_line(failed_commands, "evaluate")
  checkpoints = checkpoint.checkpoint_dir(finished_run[1])
  assert f"error: No checkpoint for step 3 in {checkpoints}; it holds steps [4, 5]." in stderr


def test_evaluate_names_a_missing_split_by_its_flag_and_lists_the_splits(failed_commands):
  stderr = _error_line(failed_commands, "split")
  assert ("error: --split='nosuchsplit': no images for this split of dataset " in stderr
          and "the splits there are ['test', 'train']." in stderr)


def test_evaluate_refuses_all_checkpoints_with_a_step(failed_commands):
  stderr = _error_line(failed_commands, "all_and_step")
  assert "error: --all_checkpoints evaluates every checkpoint: leave out --step." in stderr


def test_train_refuses_an_unknown_gan_mode_before_writing_anything(failed_commands):
  stderr = _error_line(failed_commands, "gan_mode")
  assert "error: --config.loss.gan_mode='wgan' is none of ('vanilla', 'lsgan', 'hinge', 'wgangp')" in stderr
  assert not (failed_commands.tmp / "wgan").exists()


@pytest.mark.parametrize("name, what", [
    ("damaged_translate", "the state array {array} cannot be read"),
    ("damaged_evaluate", "the state array {array} "),
])
def test_translate_and_evaluate_name_a_damaged_checkpoint_and_the_intact_ones(failed_commands, name, what):
  stderr = _error_line(failed_commands, name)
  assert "Event loop is closed" not in stderr, stderr
  line = next(line for line in stderr.splitlines() if line.startswith("error: "))
  assert re.fullmatch(r"error: Checkpoint 5 in \S+/checkpoints is damaged: "
                      + re.escape(what).replace(re.escape("{array}"), r"[\w/]+")
                      + r".* Intact: \[4\]; pick one with --step=4\.", line), line


def _committed_steps(workdir):
  """The checkpoint steps orbax has finished writing (it renames each into place when done)."""
  checkpoints = checkpoint.checkpoint_dir(workdir)
  if not checkpoints.is_dir():
    return []
  return [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]


def _wait_for(condition, process, log, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()}"
    assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
    time.sleep(0.2)


def test_sigterm_and_sigint_save_exit_0_and_the_same_command_resumes_exactly(tmp_path,
                                                                            synthetic_dir):
  """SIGTERM, then SIGINT to a real run: saved, status 0, and the same command resumes.

  The state after both stops is, bit for bit, that of a run to the same step in one go.
  """
  cadences = dict(checkpoint_every_steps=3, log_every_steps=1, sample_every_steps=100_000,
                  keep_checkpoints=100)
  config = run_config(synthetic_dir, num_train_steps=100_000, **cadences)
  workdir = tmp_path / "run"
  command = _train_command(config, workdir)
  stopped_at = 0
  for signum in (signal.SIGTERM, signal.SIGINT):
    log = tmp_path / f"{signum.name}.log"
    with log.open("w") as output:
      process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
      previous = stopped_at
      _wait_for(lambda: any(step > previous for step in _committed_steps(workdir)), process, log)
      process.send_signal(signum)
      returncode = process.wait(timeout=120)
    finally:
      process.kill()
    text = log.read_text()
    assert returncode == 0, text
    assert "Traceback" not in text, text
    stopped_at = int(re.search(rf"Stopped by {signum.name} after step (\d+); saved a checkpoint",
                               text).group(1))
    assert stopped_at > previous
    assert checkpoint_steps(workdir)[-1] == stopped_at
    assert int(checkpoint.load_state(workdir).step) == stopped_at
    if previous:
      assert f"Resuming from the checkpoint of step {previous} in" in text
    # Not a terminal: no progress bar, one line per log step with the losses, the rate and the time left.
    assert re.search(rf"step {stopped_at}/100000: d_fake=[\d.e-]+, d_loss=[\d.e-]+, d_real=[\d.e-]+, "
                     r"g_gan=[\d.e-]+, g_l1=[\d.e-]+, g_loss=[\d.e-]+, learning_rate=[\d.e-]+; "
                     r"[\d.e+]+ steps/s, (\d+ days?, )?[\d:]+ left", text), text
    assert "\r" not in text and "Got images" not in text, text
  uninterrupted = tmp_path / "uninterrupted"
  trainer.train_and_evaluate(run_config(synthetic_dir, num_train_steps=stopped_at, **cadences),
                             uninterrupted)
  assert_states_equal(checkpoint.load_state(workdir), checkpoint.load_state(uninterrupted))


def test_the_next_start_loads_the_kept_executables_and_trains_exactly_as_without(tmp_path, synthetic_dir):
  # Fresh caches: the first run compiles both programs and keeps them (cache.KeptExecutable).
  env = dict(os.environ, P2P_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
  logs = []
  for name, steps in (("first", 2), ("second", 4)):  # A new run, 4 steps: another num_train_steps, same programs.
    done = subprocess.run(_train_command(run_config(synthetic_dir, num_train_steps=steps), tmp_path / name),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    logs.append(done.stderr)
  assert "Loaded the kept executable" not in logs[0]
  assert "Loaded the kept executable of init" in logs[1] and "Loaded the kept executable of train_step" in logs[1]
  without = tmp_path / "without"
  trainer.train_and_evaluate(run_config(synthetic_dir, num_train_steps=4), without)
  assert_states_equal(checkpoint.load_state(tmp_path / "second"), checkpoint.load_state(without))


def test_every_preset_loads_and_passes_validation():
  """Each file in experiments/configs is checked here, the paper's ones against the paper."""
  presets = {path.name for path in CONFIGS.glob("*.py")} - {"__init__.py"}
  assert presets == {name.split(":")[0] for name in PAPER_PRESETS} | {"default.py", "demo.py"}
  for name in sorted(presets | set(PAPER_PRESETS)):
    config = _load_preset(name)
    assert FIXED_KEYS <= set(config.keys()), name
    assert all(isinstance(config[group], ml_collections.ConfigDict) for group in GROUPS), name
    configuration.check(config)
    assert config.num_train_steps <= 0, name  # the epochs count


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_have_the_papers_settings(name):
  config = _load_preset(name)
  dataset, direction, epochs, batch_size = PAPER_PRESETS[name]
  assert (config.dataset, config.direction, config.num_epochs, config.batch_size) == (
      dataset, direction, epochs, batch_size)
  assert config.optim.n_epochs + config.optim.n_epochs_decay == epochs
  assert (config.optim.optimizer, config.optim.lr, config.optim.kwargs.to_dict()) == (
      "adam", 2e-4, {"b1": 0.5, "b2": 0.999})
  assert (config.loss.gan_mode, config.loss.lambda_l1) == ("vanilla", 100.0)
  assert (config.crop_size, config.model.generator, config.model.num_downs) == (256, "unet", 8)
  assert (config.model.n_layers_d, config.model.norm, config.model.use_dropout) == (3, "batch", True)
  jitter = (config.preprocess, config.load_size, config.no_flip)
  if name.startswith("edges2"):  # the paper lists no jitter or mirroring for these
    assert jitter[0] == "none" and jitter[2]
  else:
    assert jitter == ("resize_and_crop", 286, False)


@pytest.mark.parametrize("name, message", [
    ("maps.py:north", r"maps.py:north: the direction after the colon must be one of \('AtoB', 'BtoA'\)"),
    ("edges2.py:cats", r"edges2.py:cats: the objects after the colon must be one of \('shoes', 'handbags'\)"),
])
def test_a_preset_argument_it_does_not_know_is_named(name, message):
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    _load_preset(name)


def test_the_demo_is_synthetic_and_small(synthetic_dir):
  config = _load_preset("demo.py")
  config.data_dir = str(synthetic_dir)
  configuration.check(config)
  assert config.dataset == "synthetic" and config.crop_size <= 64
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  assert recipe.total_steps(config, steps_per_epoch) == 10 * 256 // config.batch_size


@pytest.mark.parametrize("module", ["train", "evaluate", "translate", "export", "benchmark"])
def test_an_entry_point_runs_with_the_collector_on_and_its_imports_frozen(module, tmp_path):
  """``python -m experiments.<module>`` holds the garbage collector off during its imports only."""
  (tmp_path / "sitecustomize.py").write_text(
      "import atexit, gc, sys\n"
      "atexit.register(lambda: sys.stderr.write(f'collector on={gc.isenabled()} frozen={gc.get_freeze_count()}\\n'))\n")
  env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
  result = subprocess.run(_command(module, "--helpshort"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  on, frozen = re.search(r"collector on=(\w+) frozen=(\d+)", result.stderr).groups()
  assert on == "True" and int(frozen) > 100_000, result.stderr[-2000:]


@pytest.mark.parametrize("module", ["evaluate", "translate"])
def test_the_generator_flags_an_entry_point_shares_are_listed_in_its_own_help(module):
  """``cli.define_generator_flags`` defines them, but ``--helpshort`` lists an entry point's own flags only."""
  result = subprocess.run(_command(module, "--helpshort"), cwd=ROOT, capture_output=True, text=True, timeout=300)
  listed = set(re.findall(r"^  --(\w+):", result.stdout, re.MULTILINE))
  assert {"workdir", "step", "mode", "batch_size"} <= listed, result.stdout[-2000:]


def test_importing_the_entry_points_package_leaves_the_collector_on():
  import experiments  # pylint: disable=g-import-not-at-top,unused-import
  assert gc.isenabled()
