"""translate_paths and evaluate_checkpoint on a finished run: outputs, modes, steps, named errors."""

import json
import re
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

import tifffile

from p2p_jax import colour, configuration, fid, images, inference, lpips, perceptual, train, trainer
from p2p_jax.datasets import synthetic
from tests.conftest import run_config, tensorboard_events, tiny_config, tiny_pix2pix


def _save(path, mode, size, seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Single images of other sizes and modes than the model's 32x32 RGB, and a file to ignore."""
  folder = tmp_path_factory.mktemp("inputs")
  _save(folder / "wide.jpg", "RGB", (48, 20))
  _save(folder / "grey.png", "L", (33, 61), seed=1)
  _save(folder / "alpha.PNG", "RGBA", (40, 40), seed=2)
  (folder / "notes.txt").write_text("not an image")
  return folder


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image)


@pytest.fixture(scope="module")
def translated(inputs, finished_run, tmp_path_factory):
  """Both modes over the folder in batches of 2 (so the last batch is padded)."""
  _, workdir = finished_run
  return {mode: inference.translate_paths(workdir, inputs, tmp_path_factory.mktemp(mode), mode=mode,
                                          batch_size=2)
          for mode in ("eval", "paper")}


def test_a_folder_is_translated_back_to_each_input_size(inputs, translated):
  for mode, written in translated.items():
    assert [p.name for p in written] == ["alpha.png", "grey.png", "wide.png"], mode
    for path, source in zip(written, ("alpha.PNG", "grey.png", "wide.jpg")):
      with Image.open(path) as result, Image.open(inputs / source) as image:
        assert (result.mode, result.size) == ("RGB", image.size)


def test_the_modes_differ_and_paper_mode_is_reproducible(inputs, translated, finished_run, tmp_path):
  for eval_path, paper_path in zip(translated["eval"], translated["paper"]):
    assert not np.array_equal(_pixels(eval_path), _pixels(paper_path))
  _, workdir = finished_run
  again = inference.translate_paths(workdir, inputs, tmp_path, mode="paper", batch_size=2)
  for first, second in zip(translated["paper"], again):
    np.testing.assert_array_equal(_pixels(first), _pixels(second))


def test_one_image_with_an_older_checkpoint(inputs, translated, finished_run, tmp_path):
  _, workdir = finished_run
  written = inference.translate_paths(workdir, inputs / "wide.jpg", tmp_path, step=4)
  assert written == [tmp_path / "wide.png"]
  assert not np.array_equal(_pixels(written[0]), _pixels(translated["eval"][2]))  # step 5's


def test_every_unreadable_input_is_named_before_anything_is_written(inputs, finished_run, tmp_path):
  _, workdir = finished_run
  folder = tmp_path / "in"
  folder.mkdir()
  _save(folder / "good.jpg", "RGB", (32, 32))
  (folder / "garbage.jpg").write_bytes(b"no image here")
  data = _save(tmp_path / "whole.png", "RGB", (64, 64)).read_bytes()
  (folder / "cut.png").write_bytes(data[:len(data) // 2])
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=(
      rf"input_path={folder}: 2 of 3 images cannot be translated. Cannot read image {folder}/cut.png: .*; "
      rf"Cannot read image {folder}/garbage.jpg: cannot identify image file")):
    inference.translate_paths(workdir, folder, out)
  assert not out.exists()


@pytest.mark.parametrize("where, message", [
    ("missing", r"input_path={tmp}/missing.png: no such file or folder"),
    ("empty", r"input_path={tmp}/empty: no .jpg/.jpeg/.png/.tif/.tiff files in this folder"),
    ("same", r"output_dir={inputs} is the input folder: choose another folder"),
    ("file", r"output_dir={inputs}/wide.jpg is a file: give a folder"),
    ("batch", r"batch_size=0: must be positive"),
    ("workdir", r"No checkpoint in {tmp}/checkpoints: train with"),
])
def test_bad_arguments_are_named(inputs, finished_run, tmp_path, where, message):
  _, workdir = finished_run
  (tmp_path / "empty").mkdir()
  args = {"missing": (workdir, tmp_path / "missing.png", tmp_path / "out"),
          "empty": (workdir, tmp_path / "empty", tmp_path / "out"),
          "same": (workdir, inputs, inputs),
          "file": (workdir, inputs, inputs / "wide.jpg"),
          "batch": (workdir, inputs, tmp_path / "out"),
          "workdir": (tmp_path, inputs, tmp_path / "out")}[where]
  message = message.format(tmp=re.escape(str(tmp_path)), inputs=re.escape(str(inputs)))
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    inference.translate_paths(*args, batch_size=0 if where == "batch" else 8)


@pytest.fixture(scope="module")
def evaluated(finished_run):
  _, workdir = finished_run
  return {step: inference.evaluate_checkpoint(workdir, step=step) for step in (None, 4)}


def test_evaluate_writes_json_tensorboard_and_a_sheet(finished_run, evaluated):
  config, workdir = finished_run
  results = evaluated[None]
  assert results["step"] == 5 and results["split"] == "test" and results["mode"] == "eval"
  assert results["num_images"] == synthetic.SPLITS["test"]
  assert 0 < results["l1"] < 2 and 0 < results["psnr"] < 60 and -1 < results["ssim"] < 1
  out = workdir / inference.EVAL_DIR
  assert json.loads((out / "test_eval_step5.json").read_text()) == results
  with Image.open(out / "test_eval" / "step_00000005.png") as sheet:
    assert sheet.size == (4 * config.crop_size, config.num_sample_images * config.crop_size)
  assert "step_00000005.png" in (out / "test_eval" / "index.html").read_text()
  events = tensorboard_events(out)
  for name in ("l1", "psnr", "ssim"):
    assert events[f"test_eval/{name}"][5] == pytest.approx(results[name])
  assert 5 in events["test_eval/samples"]


def _read_folder(folder, kind):
  return np.stack([_pixels(p) for p in sorted(folder.glob(f"*_{kind}.png"))])


def test_evaluate_reports_fid_kid_lpips_and_writes_every_image(finished_run, evaluated):
  config, workdir = finished_run
  results = evaluated[None]
  assert all(np.isfinite(results[key]) for key in ("fid", "kid", "kid_std", "lpips"))
  assert results["fid"] > 0 and 0 < results["lpips"] < 1 and "missing_metrics" not in results
  folder = workdir / inference.EVAL_DIR / "test_eval_step5"
  fake, real = _read_folder(folder / "images", "fake_B"), _read_folder(folder / "images", "real_B")
  assert len(_read_folder(folder / "images", "real_A")) == len(fake) == len(real) == results["num_images"]
  assert fake.shape[1:] == (config.crop_size, config.crop_size, 3)
  # The JSON's FID is the FID of the written folders: what an external tool reads.
  params = fid.load_params()
  assert fid.fid(np.asarray(fid.features(params, fake)), np.asarray(fid.features(params, real))) == pytest.approx(
      results["fid"], rel=1e-4)
  index = (folder / "index.html").read_text()
  assert index.count("<tr><td>") == results["num_images"] and "images/0000_fake_B.png" in index
  events = tensorboard_events(workdir / inference.EVAL_DIR)
  for name in ("fid", "kid", "lpips"):
    assert events[f"test_eval/{name}"][5] == pytest.approx(results[name])


def test_the_real_features_key_changes_with_any_file_or_setting():
  files = [b"first image", b"second image"]
  key = perceptual.real_features_key(files, "256 AtoB")
  assert key == perceptual.real_features_key(list(files), "256 AtoB")
  assert len({key, perceptual.real_features_key([b"first image", b"second imagE"], "256 AtoB"),
              perceptual.real_features_key(files[::-1], "256 AtoB"),
              perceptual.real_features_key(files, "128 AtoB"),
              perceptual.real_features_key(files, "256 BtoA")}) == 5


def _copy_of(workdir, tmp_path):
  """A copy to evaluate again, so the shared run's results stay those of the fixture."""
  return shutil.copytree(workdir, tmp_path / "run")


def test_without_the_weights_evaluate_says_what_to_install_and_reports_the_rest(finished_run, monkeypatch,
                                                                                caplog, tmp_path):
  workdir = _copy_of(finished_run[1], tmp_path)
  monkeypatch.setenv(fid.WEIGHTS_ENV, "/nonexistent/default_1.pt")
  monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
  results = inference.evaluate_checkpoint(workdir, step=4, split="test")
  assert not set(perceptual.METRICS) & set(results)
  assert np.isfinite(results["psnr"]) and len(results["missing_metrics"]) == 2
  assert "pip install 'p2p_jax[metrics]'" in results["missing_metrics"][1]
  assert f"{fid.WEIGHTS_ENV}=/nonexistent/default_1.pt: no such file" in results["missing_metrics"][0]
  assert "reporting the other metrics" in caplog.text
  with pytest.raises(ValueError, match=r"all_checkpoints=True names the best checkpoint by FID: P2P_JAX"):
    inference.evaluate_checkpoints(workdir)


def test_all_checkpoints_names_the_best_by_fid_computing_the_real_features_once(finished_run, evaluated,
                                                                              monkeypatch, tmp_path):
  workdir = _copy_of(finished_run[1], tmp_path)
  shutil.rmtree(workdir / inference.EVAL_DIR / inference.REAL_FEATURES_DIR)
  calls = []
  features = fid.features
  monkeypatch.setattr(fid, "features", lambda *args: calls.append(1) or features(*args))
  summary = inference.evaluate_checkpoints(workdir, batch_size=16)
  steps = [r["step"] for r in summary["checkpoints"]]
  assert steps == [4, 5]
  fids = {r["step"]: r["fid"] for r in summary["checkpoints"]}
  assert summary["best_step"] == min(fids, key=fids.get) and summary["best_fid"] == min(fids.values())
  assert fids[5] == pytest.approx(evaluated[None]["fid"], rel=1e-6)  # The batch size changes nothing.
  assert len(calls) == 2 * 2 + 2  # 32 images in batches of 16: fake and real, then fake only.
  # Another process later: the real features come from the cache in the workdir.
  calls.clear()
  again = inference.evaluate_checkpoints(workdir, batch_size=16)
  assert len(calls) == 2 + 2 and again["best_fid"] == pytest.approx(summary["best_fid"], rel=1e-9)
  written = json.loads((workdir / inference.EVAL_DIR / "test_eval_all.json").read_text())
  assert written == summary


def test_evaluate_an_older_checkpoint(finished_run, evaluated):
  _, workdir = finished_run
  older = evaluated[4]
  assert older["step"] == 4 and older["l1"] != evaluated[None]["l1"]
  out = workdir / inference.EVAL_DIR
  assert json.loads((out / "test_eval_step4.json").read_text()) == older
  assert (out / "test_eval" / "step_00000004.png").is_file()
  assert tensorboard_events(out)["test_eval/psnr"][4] == pytest.approx(older["psnr"])


def test_evaluate_in_paper_mode_differs(finished_run, evaluated):
  _, workdir = finished_run
  paper = inference.evaluate_checkpoint(workdir, mode="paper", batch_size=16)
  assert paper["mode"] == "paper" and paper["num_images"] == synthetic.SPLITS["test"]
  assert paper["l1"] != evaluated[None]["l1"]
  assert (workdir / inference.EVAL_DIR / "test_paper_step5.json").is_file()


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=3), r"No checkpoint for step 3 in {workdir}/checkpoints; it holds steps \[4, 5\]"),
    (dict(split="val"), r"split='val': no images for this split of dataset .*synthetic-v1-seed0.*"
                        r"the splits there are \['test', 'train'\]"),
    (dict(batch_size=0), r"batch_size=0: must be positive"),
])
def test_evaluate_names_a_missing_step_or_split(finished_run, kwargs, message):
  _, workdir = finished_run
  with pytest.raises(ValueError, match=message.format(workdir=re.escape(str(workdir)))):
    inference.evaluate_checkpoint(workdir, **kwargs)


def test_evaluating_a_bucket_workdir_writes_into_the_bucket(finished_run, tmp_path, monkeypatch):
  """pathlib would turn gs://bucket/run/eval into a local folder named "gs:"."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from p2p_jax import checkpoint, summaries  # pylint: disable=g-import-not-at-top
  _, workdir = finished_run
  run = checkpoint.load_run(workdir)
  monkeypatch.setattr(checkpoint, "load_run", lambda *args, **kwargs: run)
  logdirs = []
  monkeypatch.setattr(summaries, "create_writer",
                      lambda logdir: logdirs.append(str(logdir)) or metric_writers.MultiWriter([]))
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
  monkeypatch.chdir(tmp_path)
  in_tmp = lambda fn, path, *args, **kwargs: fn(str(path).replace("gs://", f"{tmp_path}/"), *args, **kwargs)
  with epath.testing.mock_epath(open=in_tmp, makedirs=in_tmp, mkdir=in_tmp, exists=in_tmp,
                                isdir=in_tmp, listdir=in_tmp, glob=in_tmp, stat=in_tmp):
    inference.evaluate_checkpoint("gs://bucket/run")
  written = tmp_path / "bucket" / "run" / inference.EVAL_DIR
  assert (written / "test_eval_step5.json").is_file() and (written / "test_eval" / "step_00000005.png").is_file()
  assert logdirs == ["gs://bucket/run/eval"]
  assert not (tmp_path / "gs:").exists()


def test_paper_mode_results_do_not_depend_on_the_batch_size(synthetic_dir):
  """Each image's dropout mask comes from its index in the split, not its place in a batch.

  A 6-level U-Net at 64 px: the smallest with a dropout block.
  """
  config = tiny_config(num_downs=6)
  config.crop_size, config.load_size, config.data_dir = 64, 72, str(synthetic_dir)
  pix2pix = tiny_pix2pix(config)
  state = train.create_train_state(jax.random.key(0), pix2pix, configuration.image_shapes(config))
  evaluate = lambda size, seed=0: inference.evaluate(state, pix2pix.generator, config, mode="paper",
                                                     batch_size=size, seed=seed)[0]
  results = {size: evaluate(size) for size in (1, 3, 32)}
  for size in (3, 32):
    for name in ("l1", "psnr", "ssim"):
      assert results[size][name] == pytest.approx(results[1][name], rel=1e-5), (size, name)
  assert evaluate(3, seed=1)["l1"] != pytest.approx(results[1]["l1"], rel=1e-5), "the masks vary with the seed"


def _eval_network(config):
  pix2pix = tiny_pix2pix(config)
  state = train.create_train_state(jax.random.key(0), pix2pix, configuration.image_shapes(config))
  translate = jax.jit(inference.make_translate_fn(pix2pix.generator, "eval"))
  return lambda images, indices: translate(state, images, jax.random.key(0), indices)


def _smooth_image(height, width, seed=0):
  noise = np.random.default_rng(seed).normal(size=(1, height, width, 3))
  image = np.cumsum(np.cumsum(noise, 1), 2)
  return np.tanh(3 * image / np.abs(image).max()).astype(np.float32)


def test_generate_pads_any_size_to_the_networks_multiple_and_crops_back():
  shapes = []
  negate = lambda images, indices: shapes.append(images.shape) or -images
  image = _smooth_image(37, 45)
  np.testing.assert_array_equal(inference.generate(negate, image, np.zeros(1, int), multiple=32), -image)
  assert shapes == [(1, 64, 64, 3)]


def test_tiles_cover_the_image_with_weights_that_sum_to_one():
  """A pointwise network gives the same image tiled as whole, whatever the tile grid."""
  shapes = []
  pointwise = lambda images, indices: shapes.append(images.shape) or np.tanh(2 * images[..., :2])
  image = _smooth_image(150, 230)
  tiled = inference.generate(pointwise, image, np.zeros(1, int), multiple=32, tile_size=64, overlap=16)
  np.testing.assert_allclose(tiled, np.tanh(2 * image[..., :2]), atol=1e-6)
  assert set(shapes) == {(1, 64, 64, 3)} and len(shapes) == 3 * 5  # 160x256 padded: 3 rows of 5 tiles


def test_tiles_blend_without_seams():
  """A U-Net tiled in 64 px squares against the whole image: the blended overlaps hide the tile edges.

  Cut edge to edge (an overlap of one pixel) the tiles differ from the whole
  image by about the output's own mean size; blended over 16 pixels, by 1%.
  """
  network = _eval_network(tiny_config())
  image = _smooth_image(150, 230)
  whole = inference.generate(network, image, np.zeros(1, int), multiple=32, tile_size=256)
  scale = np.abs(whole).mean()
  tiled = lambda overlap: inference.generate(network, image, np.zeros(1, int), multiple=32, tile_size=64,
                                             overlap=overlap)
  assert np.abs(tiled(16) - whole).mean() < 0.05 * scale
  assert np.abs(tiled(1) - whole).mean() > 0.3 * scale


def test_a_4000_by_3000_photo_translates_at_its_own_size_in_tiles(finished_run, tmp_path, monkeypatch):
  _, workdir = finished_run
  shapes = []
  generate = inference._generate_tiled
  monkeypatch.setattr(inference, "_generate_tiled",
                      lambda translate, *args: generate(lambda x, i: shapes.append(x.shape) or translate(x, i),
                                                        *args))
  photo = tmp_path / "in" / "photo.jpg"
  photo.parent.mkdir()
  Image.fromarray((_smooth_image(3000, 4000)[0] * 127.5 + 127.5).astype(np.uint8)).save(photo)
  written, = inference.translate_paths(workdir, photo, tmp_path / "out", size="native")
  with Image.open(written) as result:
    assert (result.size, result.mode) == ((4000, 3000), "RGB")
  assert set(shapes) == {(1, inference.TILE_SIZE, inference.TILE_SIZE, 3)} and len(shapes) == 4 * 5


@pytest.mark.parametrize("preprocess, size", [("resize_and_crop", (32, 32)), ("crop", (45, 37)),
                                              ("none", (45, 37)), ("scale_width", (40, 32)),
                                              ("scale_width_and_crop", (40, 32))])
def test_eval_transform_is_the_deterministic_part_of_training(preprocess, size):
  """(width, height) of a 45x37 image for crop_size 32 and load_size 40; B follows A's size."""
  config = tiny_config()
  config.preprocess, config.load_size = preprocess, 40
  a, b = inference.input_pipeline.eval_transform(np.zeros((37, 45, 3), np.float32),
                                                  np.zeros((20, 20, 1), np.float32), config)
  assert (a.shape[1], a.shape[0]) == size and b.shape == (*a.shape[:2], 1)


@pytest.fixture(scope="module")
def band_run(synthetic_dir, tmp_path_factory):
  """(config, workdir, data): 4-band 16-bit TIFFs (A) to 16-bit grey TIFFs (B) of 45x37, trained on crops.

  input_nc=4, output_nc=1; B is the mean of A's bands.
  """
  data = tmp_path_factory.mktemp("bands")
  rng = np.random.default_rng(0)
  for split, count in (("train", 3), ("test", 2)):
    for folder in ("A", "B"):
      (data / split / folder).mkdir(parents=True)
    for i in range(count):
      bands = rng.integers(0, 65536, (37, 45, 4), np.uint16)
      tifffile.imwrite(data / split / "A" / f"{i}.tif", bands, photometric="minisblack", planarconfig="contig")
      tifffile.imwrite(data / split / "B" / f"{i}.tif", bands.mean(-1).astype(np.uint16))
  config = run_config(synthetic_dir, dataset=str(data), input_nc=4, output_nc=1, preprocess="crop",
                      num_train_steps=2, checkpoint_every_steps=2, sample_every_steps=2)
  workdir = tmp_path_factory.mktemp("band_run")
  trainer.train_and_evaluate(config, workdir)
  return config, workdir, data


def test_a_band_run_evaluates_at_native_size_and_bit_depth(band_run):
  _, workdir, _ = band_run
  results = inference.evaluate_checkpoint(workdir, scorer=perceptual.Scorer(perceptual.Weights(None, None, [])))
  assert results["num_images"] == 2 and np.isfinite(results["psnr"])
  assert "missing_metrics" not in results  # grey images are scored (as RGB of three equal channels)
  folder = workdir / inference.EVAL_DIR / "test_eval_step2" / "images"
  real_a = tifffile.imread(folder / "0_real_A.tif")
  assert real_a.shape == (37, 45, 4) and real_a.dtype == np.uint16
  with Image.open(folder / "0_fake_B.png") as fake:
    assert (fake.size, fake.mode) == ((45, 37), "I;16")


def test_a_band_run_translates_at_the_inputs_size_and_bit_depth(band_run, tmp_path):
  _, workdir, data = band_run
  bands = np.random.default_rng(5).integers(0, 65536, (29, 51, 4), np.uint16)
  tifffile.imwrite(tmp_path / "odd.tif", bands, photometric="minisblack", planarconfig="contig")
  written, = inference.translate_paths(workdir, tmp_path / "odd.tif", tmp_path / "out")
  assert written.name == "odd.png"
  with Image.open(written) as result:
    assert (result.size, result.mode) == ((51, 29), "I;16")
    assert len(np.unique(np.asarray(result))) > 256  # 16-bit levels, not 8-bit ones scaled


def test_a_band_model_names_an_input_of_other_channels(band_run, tmp_path):
  _, workdir, _ = band_run
  _save(tmp_path / "rgb.png", "RGB", (40, 40))
  tifffile.imwrite(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint16), photometric="minisblack",
                   planarconfig="contig")
  with pytest.raises(ValueError, match=rf"2 of 2 images cannot be translated. Image {tmp_path}/five.tif: it has "
                                       rf"5 channels, the model takes 4; Image {tmp_path}/rgb.png: it has 3 "
                                       r"channels, the model takes 4"):
    inference.translate_paths(workdir, tmp_path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_training_names_a_file_of_other_channels_before_it_starts(band_run, tmp_path):
  config, _, data = band_run
  tifffile.imwrite(data / "train" / "A" / "9.tif", np.zeros((37, 45, 3), np.uint16), photometric="rgb")
  tifffile.imwrite(data / "train" / "B" / "9.tif", np.zeros((37, 45), np.uint16))
  try:
    with pytest.raises(ValueError, match=r"Image .*train/A/9.tif: it has 3 channels, the model takes 4 "
                                         r"\(config.input_nc / config.output_nc\)"):
      trainer.train_and_evaluate(config, tmp_path / "work")
  finally:
    (data / "train" / "A" / "9.tif").unlink()
    (data / "train" / "B" / "9.tif").unlink()


@pytest.fixture(scope="module")
def colorization_run(synthetic_dir, tmp_path_factory):
  """(workdir, data): the reference's colorization mode on the synthetic set's B photos, 2 steps."""
  data = tmp_path_factory.mktemp("photos")
  root = synthetic.ensure_dataset(str(synthetic_dir), 0)
  for split in ("train", "test"):
    (data / split).mkdir()
    for path in sorted((root / split).iterdir())[:3]:
      with Image.open(path) as pair:
        pair.crop((pair.width // 2, 0, pair.width, pair.height)).save(data / split / path.name)
  config = run_config(synthetic_dir, dataset=str(data), dataset_mode="colorization", input_nc=1, output_nc=2,
                      num_train_steps=2, checkpoint_every_steps=2, sample_every_steps=2)
  workdir = tmp_path_factory.mktemp("colorization_run")
  trainer.train_and_evaluate(config, workdir)
  return workdir, data


def test_colorization_scores_and_writes_rgb(colorization_run):
  workdir, _ = colorization_run
  results = inference.evaluate_checkpoint(workdir, scorer=perceptual.Scorer(perceptual.Weights(None, None, [])))
  assert results["num_images"] == 3 and "missing_metrics" not in results
  folder = workdir / inference.EVAL_DIR / "test_eval_step2" / "images"
  name = sorted(folder.iterdir())[0].name.rsplit("_", 2)[0]
  modes = {}
  for kind in ("real_A", "fake_B", "real_B"):
    with Image.open(folder / f"{name}_{kind}.png") as image:
      modes[kind] = (image.mode, image.size)
  assert modes == {"real_A": ("L", (32, 32)), "fake_B": ("RGB", (32, 32)), "real_B": ("RGB", (32, 32))}


def test_colorization_translates_a_photo_keeping_its_lightness(colorization_run, tmp_path):
  """The output is RGB at the photo's size, of the photo's own L (the model gives only ab)."""
  workdir, data = colorization_run
  photo = sorted((data / "test").iterdir())[0]
  with Image.open(photo) as image:
    big = image.resize((75, 50), Image.Resampling.BICUBIC)
  big.save(tmp_path / "photo.png")
  written, = inference.translate_paths(workdir, tmp_path / "photo.png", tmp_path / "out")
  with Image.open(written) as result:
    assert (result.mode, result.size) == ("RGB", (75, 50))
    lightness = lambda x: np.asarray(colour.rgb_to_lab(np.asarray(x, np.float32) / 255))[..., 0]
    difference = np.abs(lightness(result) - lightness(big))
  assert np.median(difference) < 1.0, np.median(difference)  # L in [0, 100]; out-of-gamut ab clip some
