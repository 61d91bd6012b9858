"""The README's code runs as written, and CI runs the README's test command."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from p2p_jax import checkpoint, export, inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _snippet(marker: str) -> str:
  return re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", README, re.S).group(1)


def _python(args, cwd, tmp_path, timeout=900):
  """Runs python with the checkout importable, on one CPU device as on a user's machine."""
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "Traceback" not in result.stderr, result.stderr[-4000:]
  return result


def test_the_train_step_snippet_runs_as_written(tmp_path):
  result = _python(["-c", _snippet("readme-snippet")], tmp_path, tmp_path)
  printed = result.stdout.strip().splitlines()[-1]
  for name in ("d_real", "d_fake", "d_loss", "g_gan", "g_l1", "g_loss"):
    assert f"'{name}': " in printed


def test_the_own_networks_snippet_trains_resumes_and_translates(tmp_path):
  result = _python(["-c", _snippet("readme-own-networks")], tmp_path, tmp_path)
  workdir = tmp_path / "runs" / "own"
  assert checkpoint.make_manager(workdir, create=False).all_steps() == [4, 8]
  state = checkpoint.load_state(workdir, pix2pix=_snippet_pix2pix(tmp_path))
  assert int(state.step) == 8 and "Conv_0" in state.g_params, "the snippet's own generator"
  with Image.open(workdir / "translated" / "labels.png") as image:
    assert image.size == (96, 64)
  assert "runs/own/translated/labels.png" in result.stdout
  # Networks given as objects are not what the saved config names: the command line says so.
  refused = subprocess.run([sys.executable, "-m", "experiments.translate", f"--workdir={workdir}",
                            f"--input={workdir / 'labels.png'}", f"--output={tmp_path / 'out'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
  assert ("was trained with the generator __main__.ResidualGenerator, which its config does not name "
          "(--config.model.generator='unet')") in refused.stderr


def _snippet_pix2pix(tmp_path):
  """The snippet's Pix2Pix, built in this process from its own definitions."""
  module = tmp_path / "readme_networks.py"
  if not module.exists():
    module.write_text(_definitions())
  sys.path.insert(0, str(tmp_path))
  try:
    import readme_networks  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(tmp_path))
  from p2p_jax import input_pipeline, recipe  # pylint: disable=g-import-not-at-top
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.data_dir = str(tmp_path / "cache" / "p2p_jax")
  base = recipe.Pix2Pix.from_config(config, steps_per_epoch=input_pipeline.steps_per_epoch(config))
  return base.replace(generator=readme_networks.ResidualGenerator(),
                      g_losses={**base.g_losses, "fm": (10.0, readme_networks.feature_matching)})


def _definitions() -> str:
  """The own-networks snippet's imports, module and loss term, without the lines that train."""
  code = _snippet("readme-own-networks")
  return code[:code.index("\nconfig = ")]


def test_the_same_networks_named_in_a_config_train_resume_translate_and_evaluate(tmp_path):
  (tmp_path / "readme_networks.py").write_text(_definitions())
  (tmp_path / "own_config.py").write_text(textwrap.dedent('''
      from experiments.configs import demo

      def get_config():
        config = demo.get_config()
        config.model.generator = "readme_networks:ResidualGenerator"
        config.model.generator_kwargs.blocks = 1
        config.loss.terms.fm = {"fn": "readme_networks:feature_matching", "weight": 10.0}
        config.num_train_steps, config.checkpoint_every_steps, config.sample_every_steps = 2, 2, 2
        return config
  '''))
  workdir = tmp_path / "run"
  train = ["-m", "experiments.train", f"--config={tmp_path / 'own_config.py'}", f"--workdir={workdir}"]
  first = _python(train, ROOT, tmp_path)
  assert re.search(r"step 2/2: d_fake=.*g_fm=[\d.e-]+, g_gan=", first.stderr), first.stderr[-3000:]
  resumed = _python([*train, "--config.num_train_steps=4"], ROOT, tmp_path)
  assert "Resuming from the checkpoint of step 2" in resumed.stderr
  assert checkpoint.make_manager(workdir, create=False).all_steps() == [2, 4]
  Image.new("RGB", (80, 48), (0, 0, 170)).save(tmp_path / "labels.png")
  _python(["-m", "experiments.translate", f"--workdir={workdir}", f"--input={tmp_path / 'labels.png'}",
           f"--output={tmp_path / 'out'}"], ROOT, tmp_path)
  with Image.open(tmp_path / "out" / "labels.png") as image:
    assert image.size == (80, 48)
  evaluated = _python(["-m", "experiments.evaluate", f"--workdir={workdir}"], ROOT, tmp_path)
  assert '"step": 4' in evaluated.stdout and '"l1": ' in evaluated.stdout


def test_the_onnx_snippet_translates_as_translate_does(tmp_path, finished_run):
  _, workdir = finished_run
  export.export_generator(workdir, tmp_path / "demo.onnx", "onnx", dtype="uint8")
  pixels = np.random.RandomState(0).randint(0, 256, (32, 32, 3), np.uint8)
  Image.fromarray(pixels).save(tmp_path / "input.png")
  _python(["-c", _snippet("readme-onnx")], tmp_path, tmp_path)
  expected, = inference.translate_paths(workdir, tmp_path / "input.png", tmp_path / "translated")
  difference = np.abs(np.asarray(Image.open(tmp_path / "translated.png"), int) - np.asarray(Image.open(expected)))
  assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", README)
  assert len(commands) == 2, "two set-up commands: the main job and the tests"
  assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_suites_shared_set_up_imports_no_tensorflow(tmp_path):
  """CI runs the suite under pytest-xdist, whose controller imports tests/conftest.py and runs no
  test: TensorFlow imported there printed its start-up lines at the end of every CI log."""
  check = "import sys, tests.conftest; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')[:3])"
  assert _python(["-c", check], ROOT, tmp_path).stdout.strip() == "[]"


def test_the_evaluate_commands_run_as_written_and_report_the_fields_metrics(finished_run, tmp_path):
  """The README's evaluate lines, on a copy of a finished run at runs/demo: FID, KID, LPIPS in the JSON."""
  shutil.copytree(finished_run[1], tmp_path / "runs" / "demo")
  lines = re.findall(r"^python -m experiments\.evaluate --workdir runs/demo(?: --all_checkpoints)?$", README, re.M)
  assert len(lines) == 2
  plain, every = (json.loads(_python(shlex.split(line)[1:], tmp_path, tmp_path).stdout) for line in lines)
  assert all(np.isfinite(plain[key]) for key in ("fid", "kid", "lpips", "l1", "psnr", "ssim"))
  assert (tmp_path / "runs" / "demo" / "eval" / f"test_eval_step{plain['step']}" / "index.html").is_file()
  assert every["best_step"] in {r["step"] for r in every["checkpoints"]}


def test_the_channels_section_trains_on_16_bit_grey_pairs_and_translates_at_native_size(finished_run, tmp_path):
  """The README's commands of "Channels, bit depth and image sizes" as written, on small stand-ins.

  The training line gets a tiny network and two steps appended (the README's trains the paper's U-Net
  for 200 epochs); the data, the scan and the photo are made here.
  """
  section = README[README.index("### Channels, bit depth and image sizes"):README.index("## Translating and evaluating")]
  train, scan, native = re.findall(r"^(python -m experiments\.\S+ (?:.*\\\n)?.*)$", section, re.M)
  levels = np.random.default_rng(0).integers(0, 65536, (40, 40), np.uint16)
  for split in ("train", "test"):
    for side in ("A", "B"):
      (tmp_path / "data" / "depth" / split / side).mkdir(parents=True)
      Image.fromarray(levels if side == "A" else 65535 - levels).save(tmp_path / "data" / "depth" / split / side / "0.png")
  Image.fromarray(levels).resize((4000, 3000)).save(tmp_path / "scan_4000x3000.png")
  Image.fromarray(np.zeros((30, 45, 3), np.uint8)).save(tmp_path / "photo.jpg")
  shutil.copytree(finished_run[1], tmp_path / "runs" / "demo")
  train = train.replace("\\\n", " ").replace("experiments/configs/default.py", str(ROOT / "experiments/configs/default.py"))
  train = train.replace("/data/depth", str(tmp_path / "data" / "depth"))
  small = ("--config.batch_size=1 --config.crop_size=32 --config.load_size=36 --config.model.num_downs=5 "
           "--config.model.ngf=8 --config.model.ndf=8 --config.num_train_steps=2")
  for line in (f"{train} {small}", scan, native):
    _python(shlex.split(line)[1:], tmp_path, tmp_path)
  with Image.open(tmp_path / "runs" / "depth" / "out" / "scan_4000x3000.png") as result:
    assert (result.mode, result.size) == ("I;16", (4000, 3000))
  with Image.open(tmp_path / "runs" / "demo" / "native" / "photo.png") as result:
    assert (result.mode, result.size) == ("RGB", (45, 30))
