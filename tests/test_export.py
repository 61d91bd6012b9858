"""Exported generators: each format, run by its own runtime, gives translate's numbers; clear refusals."""

import json
import subprocess
import sys

from absl import logging
import jax
import numpy as np
import onnx
import pytest
import tensorflow as tf  # Its error type, for a size a SavedModel refuses.
from PIL import Image

from p2p_jax import checkpoint, configuration, export, inference, train
from tests.conftest import tiny_config, tiny_pix2pix

SIZES = (32, 64)  # Two spatial sizes: the training crop and twice it.


@pytest.fixture(scope="module")
def run(finished_run):
  """(workdir, checkpoint.Run) of the shared finished run (32 px crops, a 5-level U-Net)."""
  _, workdir = finished_run
  return workdir, checkpoint.load_run(workdir)


def _inputs(size, batch=3, seed=0):
  return np.random.RandomState(seed + size).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _translated(run, images, mode="eval", seed=0):
  """What experiments.translate computes for ``images`` (one batch that starts the list)."""
  translate = jax.jit(inference.make_translate_fn(run.pix2pix.generator, mode))
  return np.asarray(translate(run.state, images, jax.random.key(seed), np.arange(len(images))))


def _runtime(fmt):
  return lambda path, *args: export.load_exported(path, fmt)(*args)


RUNTIMES = {fmt: _runtime(fmt) for fmt in export.FORMATS}  # (path, images[, seed]) -> translated


def _output(tmp_path, fmt, name="model"):
  return tmp_path / (name if fmt == "saved_model" else f"{name}.{fmt}")


def test_load_generator_translates_as_translate_does_without_the_training_state(run):
  workdir, loaded = run
  generator = export.load_generator(workdir)
  assert generator.step == int(loaded.state.step) and generator.size_multiple == 32
  assert set(generator.variables) == {"params", "batch_stats"}  # No optimiser state, no discriminator.
  for size in SIZES:
    np.testing.assert_allclose(generator(_inputs(size)), _translated(loaded, _inputs(size)), atol=1e-6)
  paper = export.load_generator(workdir, mode="paper")
  np.testing.assert_allclose(paper(_inputs(32), seed=3), _translated(loaded, _inputs(32), "paper", seed=3),
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"images of shape \(1, 40, 32, 3\): height and width must be positive "
                                       r"multiples of 32"):
    generator(np.zeros((1, 40, 32, 3), np.float32))


@pytest.mark.parametrize("fmt", ["saved_model", "stablehlo"])
def test_a_dynamic_size_export_gives_translates_numbers_at_two_sizes_and_any_batch(run, tmp_path, fmt):
  workdir, loaded = run
  path = _output(tmp_path, fmt)
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  info = export.export_generator(workdir, path, fmt)
  assert absl_logger.level == level, "the export leaves the caller's logging as it was"
  assert info["height"] is None and info["size_multiple"] == 32 and info["layout"] == "NHWC"
  for size, batch in zip(SIZES, (3, 1)):
    np.testing.assert_allclose(RUNTIMES[fmt](path, _inputs(size, batch)), _translated(loaded, _inputs(size, batch)),
                               atol=1e-4)


def test_an_onnx_export_gives_translates_numbers_at_two_sizes_and_any_batch(run, tmp_path):
  workdir, loaded = run
  for size in SIZES:
    path = tmp_path / f"model{size}.onnx"
    export.export_generator(workdir, path, "onnx", size=size)
    meta = {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props}
    assert meta["height"] == size and meta["layout"] == "NHWC" and meta["value_range"] == [-1.0, 1.0]
    for batch in (1, 3):
      np.testing.assert_allclose(RUNTIMES["onnx"](path, _inputs(size, batch)), _translated(loaded, _inputs(size, batch)),
                                 atol=1e-4)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
  """(workdir, checkpoint.Run) of a freshly initialised 6-level U-Net at 64 px: one block has dropout.

  Trained (as it were) with the matmul formulations, which the export must not keep.
  """
  config = tiny_config(num_downs=6, conv_impl="matmul", upconv_impl="matmul")
  config.load_size, config.crop_size = 72, 64
  pix2pix = tiny_pix2pix(config)
  workdir = tmp_path_factory.mktemp("dropout")
  manager = checkpoint.make_manager(workdir)
  checkpoint.save(manager, train.create_train_state(jax.random.key(0), pix2pix, configuration.image_shapes(config)),
                  1, config, pix2pix)
  manager.wait_until_finished()
  return workdir, checkpoint.load_run(workdir)


def test_the_export_uses_xla_convolutions_whatever_the_run_trained_with(dropout_run, tmp_path):
  workdir, loaded = dropout_run
  path = tmp_path / "model.stablehlo"
  export.export_generator(workdir, path, "stablehlo")
  program = jax.export.deserialize(path.read_bytes()).mlir_module()
  assert program.count("stablehlo.convolution") == 12 and "dot_general" not in program  # 6 down, 6 up.
  for size in (64, 128):
    np.testing.assert_allclose(RUNTIMES["stablehlo"](path, _inputs(size)), _translated(loaded, _inputs(size)), atol=1e-4)


@pytest.mark.parametrize("fmt", ["saved_model", "stablehlo"])
def test_a_paper_mode_export_takes_the_seed_and_draws_translates_masks(dropout_run, tmp_path, fmt):
  workdir, loaded = dropout_run
  path = _output(tmp_path, fmt)
  export.export_generator(workdir, path, fmt, mode="paper")
  by_seed = {seed: RUNTIMES[fmt](path, _inputs(64), seed) for seed in (0, 7)}
  for seed, translated in by_seed.items():
    np.testing.assert_allclose(translated, _translated(loaded, _inputs(64), "paper", seed=seed), atol=1e-4)
  assert np.abs(by_seed[0] - by_seed[7]).max() > 1e-3  # The seed reaches the dropout masks.


@pytest.mark.parametrize("fmt", ["onnx", "saved_model", "stablehlo"])
def test_a_uint8_nchw_export_writes_the_pixels_translate_writes(run, tmp_path, fmt):
  workdir, _ = run
  rng = np.random.RandomState(1)
  pixels = rng.randint(0, 256, (2, 32, 32, 3), np.uint8)
  for i, image in enumerate(pixels):
    Image.fromarray(image).save(tmp_path / f"in{i}.png")
  written = inference.translate_paths(workdir, tmp_path, tmp_path / "translated")
  expected = np.stack([np.asarray(Image.open(p)) for p in sorted(written)])
  path = _output(tmp_path, fmt)
  info = export.export_generator(workdir, path, fmt, dtype="uint8", layout="NCHW")
  assert info["value_range"] == [0, 255] and info["layout"] == "NCHW"
  actual = RUNTIMES[fmt](path, pixels.transpose(0, 3, 1, 2))
  assert actual.dtype == np.uint8 and actual.shape == (2, 3, 32, 32)
  difference = np.abs(actual.transpose(0, 2, 3, 1).astype(int) - expected)
  assert difference.max() <= 1 and (difference == 0).mean() > 0.99  # 1e-4 apart: a level at a rounding edge.


def test_a_size_the_export_cannot_take_is_refused_in_words(run, tmp_path):
  workdir, _ = run
  with pytest.raises(ValueError, match=r"^size=48: this generator takes heights and widths that are positive "
                                       r"multiples of 32"):
    export.export_generator(workdir, tmp_path / "m.onnx", "onnx", size=48)
  saved = tmp_path / "saved"
  export.export_generator(workdir, saved, "saved_model")
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: height and width must be multiples of 32"):
    RUNTIMES["saved_model"](saved, np.zeros((1, 40, 32, 3), np.float32))
  hlo = tmp_path / "m.stablehlo"
  export.export_generator(workdir, hlo, "stablehlo")
  assert json.loads(export.metadata_path(hlo).read_text())["size_multiple"] == 32
  with pytest.raises(ValueError, match=r"Input shapes do not match the polymorphic shapes specification"):
    RUNTIMES["stablehlo"](hlo, np.zeros((1, 40, 32, 3), np.float32))
  assert not (tmp_path / "m.onnx").exists()


def test_a_missing_checkpoint_converter_or_bad_output_is_refused_before_anything_is_written(
    run, tmp_path, monkeypatch):
  workdir, _ = run
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*empty/checkpoints"):
    export.export_generator(tmp_path / "empty", tmp_path / "out" / "m.onnx", "onnx")
  with pytest.raises(ValueError, match=r"output=.* is a folder: give the path of the onnx file"):
    export.export_generator(workdir, tmp_path, "onnx")
  with pytest.raises(ValueError, match=r"fmt='onnx' with mode='paper'"):
    export.export_generator(workdir, tmp_path / "out" / "m.onnx", "onnx", mode="paper")
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # As if not installed.
  with pytest.raises(ImportError, match=r"fmt='onnx' needs jax2onnx and onnxruntime, which are not installed: "
                                        r"pip install 'p2p_jax\[export\]'"):
    export.export_generator(workdir, tmp_path / "out" / "m.onnx", "onnx")
  assert not (tmp_path / "out").exists() and not (tmp_path / "empty").exists()


def test_the_command_exports_and_says_a_bad_flag_in_one_line(run, tmp_path):
  workdir, loaded = run
  command = [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--format=onnx"]
  done = subprocess.run([*command, f"--output={tmp_path / 'm.onnx'}"], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(RUNTIMES["onnx"](tmp_path / "m.onnx", _inputs(32)), _translated(loaded, _inputs(32)),
                             atol=1e-4)
  refused = subprocess.run([*command, "--size=48", f"--output={tmp_path / 'n.onnx'}"], capture_output=True,
                           text=True, timeout=600)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert refused.stderr.strip().splitlines()[-1].startswith("error: --size=48: this generator takes heights")
