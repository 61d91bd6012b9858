"""The tf.data pipeline: layouts, preprocessing, the resumable host-sharded stream, errors."""

import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from p2p_jax import images, input_pipeline
from tests.conftest import tiny_config

N_TRAIN = 6


def _pair(index: int, height: int = 20, width: int = 40) -> np.ndarray:
  """A|B: A's grey level encodes the index, B is A's negative (so A and B are told apart)."""
  pair = np.zeros((height, width, 3), np.uint8)
  pair[:, : width // 2] = 20 + 30 * index
  pair[:, width // 2:] = 255 - (20 + 30 * index)
  return pair


def _write_pairs(root: pathlib.Path, split: str, count: int, **shape) -> pathlib.Path:
  (root / split).mkdir(parents=True, exist_ok=True)
  for i in range(count):
    Image.fromarray(_pair(i, **shape)).save(root / split / f"{i}.png")
  return root


@pytest.fixture
def folder(tmp_path):
  _write_pairs(tmp_path, "train", N_TRAIN)
  return _write_pairs(tmp_path, "test", 3)


def _config(dataset, **overrides):
  config = tiny_config()
  config.dataset = str(dataset)
  config.update(overrides)
  return config


def _batches(config, count, **kwargs):
  iterator = input_pipeline.make_train_dataset(config, **kwargs).as_numpy_iterator()
  return [next(iterator) for _ in range(count)]


def _indices(images):
  """Recovers the example index from A's grey level."""
  return [int(round((float(np.mean(a)) * 127.5 + 127.5 - 20) / 30)) for a in images]


def test_batches_are_cropped_scaled_and_paired(folder):
  batch = _batches(_config(folder), 1)[0]
  assert batch["A"].shape == batch["B"].shape == (2, 32, 32, 3)
  assert batch["A"].dtype == np.float32
  assert -1.0 <= batch["A"].min() and batch["B"].max() <= 1.0
  # B is the negative of A in our fixture; flipping and cropping keep them aligned.
  np.testing.assert_allclose(batch["A"] + batch["B"], 0.0, atol=0.02)


def test_direction_b_to_a_swaps_the_halves(folder):
  a_to_b = _batches(_config(folder), 1)[0]
  b_to_a = _batches(_config(folder, direction="BtoA"), 1)[0]
  np.testing.assert_allclose(a_to_b["A"], b_to_a["B"], atol=1e-6)


def test_each_epoch_visits_every_example_once(folder):
  config = _config(folder, preprocess="none", no_flip=True)
  batches = _batches(config, N_TRAIN)  # two epochs of 6 examples in batches of 2
  seen = _indices(np.concatenate([b["A"] for b in batches]))
  assert sorted(seen[:N_TRAIN]) == sorted(seen[N_TRAIN:]) == list(range(N_TRAIN))
  assert seen[:N_TRAIN] != seen[N_TRAIN:], "each epoch has its own permutation"


def test_same_seed_same_stream_other_seed_other_stream(folder):
  first, again = _batches(_config(folder), 3), _batches(_config(folder), 3)
  other = _batches(_config(folder, seed=1), 3)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["A"], y["A"])
  assert any(not np.array_equal(x["A"], y["A"]) for x, y in zip(first, other))


def test_resuming_at_step_k_continues_the_stream(folder):
  config = _config(folder)
  uninterrupted = _batches(config, 5)
  resumed = _batches(config, 2, start_step=3)
  for x, y in zip(uninterrupted[3:], resumed):
    np.testing.assert_array_equal(x["A"], y["A"])
    np.testing.assert_array_equal(x["B"], y["B"])


def test_processes_read_disjoint_slices_of_the_same_global_batches(folder):
  config = _config(folder, batch_size=4)
  global_batches = _batches(config, 3, process_index=0, process_count=1)
  slices = [_batches(config, 3, process_index=p, process_count=2) for p in range(2)]
  for k, batch in enumerate(global_batches):
    assert slices[0][k]["A"].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([slices[0][k]["A"], slices[1][k]["A"]]), batch["A"])


def test_separate_a_and_b_folders(tmp_path):
  for side, value in (("A", 60), ("B", 200)):
    (tmp_path / "train" / side).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((24, 30, 3), value, np.uint8)).save(tmp_path / "train" / side / f"{i}.jpg")
  batch = _batches(_config(tmp_path, batch_size=3), 1)[0]
  np.testing.assert_allclose(batch["A"], 60 / 127.5 - 1, atol=0.02)
  np.testing.assert_allclose(batch["B"], 200 / 127.5 - 1, atol=0.02)
  (tmp_path / "train" / "B" / "2.jpg").unlink()
  with pytest.raises(ValueError, match=r"1 images in .*train/A have no namesake in .*train/B, e.g. '2.jpg'"):
    input_pipeline.num_examples(_config(tmp_path), "train")


def test_grayscale_rgba_and_png_become_rgb(tmp_path):
  (tmp_path / "train").mkdir()
  Image.fromarray(np.full((20, 40), 128, np.uint8), "L").save(tmp_path / "train" / "gray.png")
  Image.fromarray(np.full((20, 40, 4), 128, np.uint8), "RGBA").save(tmp_path / "train" / "rgba.png")
  Image.fromarray(np.full((20, 40), 128, np.uint8), "L").save(tmp_path / "train" / "gray.jpg")
  batch = _batches(_config(tmp_path, batch_size=3), 1)[0]
  assert batch["A"].shape == (3, 32, 32, 3)
  np.testing.assert_allclose(batch["A"], 128 / 127.5 - 1, atol=0.02)


def test_halves_of_any_aspect_are_resized(tmp_path):
  _write_pairs(tmp_path, "train", 2, height=15, width=50)  # like people2outline's 512x157
  assert _batches(_config(tmp_path), 1)[0]["A"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("preprocess, shape", [
    ("resize_and_crop", (32, 32)), ("crop", (32, 32)), ("scale_width_and_crop", (32, 32)),
    # Whole images, as the reference, at the nearest multiple of the U-Net's 32: 40x45 -> 32x32,
    # and scaled to width 40 (load_size), 35x40 -> 32x32; 70x90 -> 64x96, 62x80 -> 64x96.
    ("none", (32, 32)), ("scale_width", (32, 32))])
def test_every_preprocess_mode_yields_its_size(tmp_path, preprocess, shape):
  _write_pairs(tmp_path, "train", 2, height=40, width=90)
  config = _config(tmp_path, preprocess=preprocess, load_size=40)
  assert _batches(config, 1)[0]["A"].shape == (2, *shape, 3)


@pytest.mark.parametrize("preprocess, load_size, shape", [("none", 40, (64, 96)), ("scale_width", 90, (64, 96)),
                                                         ("scale_width", 64, (64, 64))])
def test_whole_image_modes_keep_the_aspect_at_the_networks_multiple(tmp_path, preprocess, load_size, shape):
  _write_pairs(tmp_path, "train", 2, height=70, width=180)
  config = _config(tmp_path, preprocess=preprocess, load_size=load_size)
  assert _batches(config, 1)[0]["A"].shape == (2, *shape, 3)


def test_whole_image_modes_refuse_a_batch_of_two_sizes(tmp_path):
  _write_pairs(tmp_path, "train", 1, height=40, width=90)
  Image.fromarray(_pair(1, height=70, width=180)).save(tmp_path / "train" / "wide.png")
  with pytest.raises(ValueError, match=r"config.preprocess='none' trains on whole images.*batch_size=2.*"
                                       r"0.png becomes 32x32 but wide.png 64x96"):
    input_pipeline.make_train_dataset(_config(tmp_path, preprocess="none"))
  input_pipeline.make_train_dataset(_config(tmp_path, preprocess="none", batch_size=1))


def test_eval_dataset_is_ordered_unjittered_and_keeps_the_last_batch(folder):
  config = _config(folder, batch_size=2)
  batches = list(input_pipeline.make_eval_dataset(config).as_numpy_iterator())
  assert [len(b["filename"]) for b in batches] == [2, 1]
  assert [f.decode() for b in batches for f in b["filename"]] == ["0.png", "1.png", "2.png"]
  assert _indices(np.concatenate([b["A"] for b in batches])) == [0, 1, 2]
  assert input_pipeline.num_examples(config, "test") == 3
  assert input_pipeline.steps_per_epoch(config) == N_TRAIN // 2


def test_synthetic_dataset_is_made_once_and_deterministically(tmp_path):
  config = tiny_config()
  config.data_dir = str(tmp_path / "a")
  batch = _batches(config, 1)[0]
  assert batch["A"].shape == (2, 32, 32, 3)
  again = tiny_config()
  again.data_dir = str(tmp_path / "b")
  np.testing.assert_array_equal(_batches(again, 1)[0]["B"], batch["B"])
  assert input_pipeline.num_examples(config, "test") == 32


def test_shard_for_devices():
  batch = {"A": np.zeros((8, 4, 4, 3))}
  assert input_pipeline.shard_for_devices(batch, 4)["A"].shape == (4, 2, 4, 4, 3)
  with pytest.raises(ValueError, match="A batch of 8 examples cannot be split evenly over 3 devices"):
    input_pipeline.shard_for_devices(batch, 3)


# Bad input: each error names the file or the config key.

def test_a_file_that_does_not_decode_is_named(folder):
  (folder / "train" / "broken.jpg").write_bytes(b"not an image")
  with pytest.raises(ValueError, match=r"Cannot decode image .*train/broken.jpg.*skip_bad_files=True"):
    input_pipeline.make_train_dataset(_config(folder))


def test_a_truncated_file_is_named_before_training(folder):
  whole = folder / "train" / "whole.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), np.uint8)).save(whole)
  truncated = folder / "train" / "truncated.jpg"
  truncated.write_bytes(whole.read_bytes()[:1000])
  assert Image.open(truncated).size == (80, 40), "the header survives: only a full decode finds it"
  with pytest.raises(ValueError, match=r"Cannot decode image .*train/truncated.jpg: .*skip_bad_files=True"):
    input_pipeline.make_train_dataset(_config(folder))


def test_skipping_bad_files_warns_with_a_count(folder, caplog):
  (folder / "train" / "broken.jpg").write_bytes(b"not an image")
  config = _config(folder, skip_bad_files=True)
  assert input_pipeline.num_examples(config, "train") == N_TRAIN
  assert "Skipped 1 of 7 files that do not decode" in caplog.text


def test_a_single_image_is_not_a_pair(folder):
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "train" / "photo.jpg")
  with pytest.raises(ValueError, match=r"train/photo.jpg is 40x30 \(width x height\): not an A\|B pair"):
    input_pipeline.make_train_dataset(_config(folder))


def test_a_missing_or_empty_split_lists_what_was_looked_for(folder):
  (folder / "empty").mkdir()
  for split in ("empty", "nowhere"):
    with pytest.raises(ValueError, match=rf"split='{split}': no images for this split .*looked for "
                                         rf".*{split}/\*.*{split}/A.*the splits there are \['test', 'train'\]"):
      input_pipeline.num_examples(_config(folder), split)


def test_a_dataset_that_is_not_a_folder_is_named():
  with pytest.raises(ValueError, match=r"config.dataset='/no/such/folder' is neither 'synthetic'"):
    input_pipeline.num_examples(_config("/no/such/folder"), "train")


def test_an_odd_width_pair_gives_b_the_extra_column(tmp_path):
  """The reference (aligned_dataset.py) splits at int(w / 2) and B keeps the rest: AB.crop((w2, 0, w, h))."""
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  pair = np.random.default_rng(0).integers(0, 256, (20, 41, 3), np.uint8)
  pair[:, -1] = 255  # B's last column, which a split at 2 * (w // 2) drops.
  path = tmp_path / "pair.png"
  Image.fromarray(pair).save(path)
  encoded = tf.io.read_file(str(path))
  source = input_pipeline.PairSource("pairs", ["pair.png"], None, side_by_side=True)
  a, b = input_pipeline._decode_pair(encoded, tf.constant(b""), source, _config("unused"))
  expected_a, expected_b = ref.split_ab(Image.open(path))
  np.testing.assert_array_equal(a, np.asarray(expected_a))
  np.testing.assert_array_equal(b, np.asarray(expected_b))
  assert b.shape == (20, 21, 3) and np.all(np.asarray(b)[:, -1] == 255)


@pytest.mark.parametrize("preprocess, size", [("resize_and_crop", (53, 41)), ("crop", (50, 44)),
                                              ("scale_width_and_crop", (53, 41))])
@pytest.mark.parametrize("example", range(4))
def test_jitter_is_the_references_resize_crop_and_flip(preprocess, size, example):
  """On textured images, A and B as the reference's get_transform makes them with the same crop and flip.

  A crop one pixel off, a flip not applied or applied to one side only, or
  A and B cropped apart shows as a mean error of 0.3 to 0.4 here; the two
  bicubic resizes (TF's and PIL's) differ by 0.003 on average and by up to
  0.18 where they ring differently at the texture's edges.
  """
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  config = _config("unused", preprocess=preprocess, load_size=44, crop_size=32)
  rng = np.random.default_rng(example)
  texture = lambda: np.kron(rng.integers(0, 256, (size[1] // 2 + 1, size[0] // 2 + 1, 3)),
                            np.ones((2, 2, 1)))[:size[1], :size[0]].astype(np.uint8)
  a, b = texture(), texture()
  seed = input_pipeline._fold_in(tf.constant([config.seed, 0], tf.int64), 0, example)
  ours_a, ours_b = input_pipeline._jitter(tf.constant(a), tf.constant(b), config, seed)
  resized = {"resize_and_crop": (config.load_size, config.load_size), "crop": a.shape[:2],
             "scale_width_and_crop": (int(max(config.load_size * size[1] / size[0], 32)), config.load_size)}[preprocess]
  top, left, flip = (int(v) for v in input_pipeline.jitter_params(*resized, config, seed))
  params = {"crop_pos": (left, top), "flip": bool(flip)}
  for ours, image in ((ours_a, a), (ours_b, b)):
    theirs = ref.reference_transform(Image.fromarray(image), params, preprocess, config.load_size,
                                     config.crop_size)
    assert ours.shape == theirs.shape == (32, 32, 3)
    error = np.abs(np.asarray(images.to_unit_range(ours, 8)) - theirs)
    assert error.mean() < 0.02 and error.max() < 0.25, (error.mean(), error.max())


def _write_grey16(path, levels):
  tf.io.write_file(str(path), tf.io.encode_png(levels[..., None].astype(np.uint16)))


def test_sixteen_bit_grey_pairs_keep_their_precision(tmp_path):
  """Levels 1000 apart by 1 stay apart: scaled by 65535, not clipped to 8 bits."""
  levels = (1000 + np.arange(32 * 32)).reshape(32, 32)
  for split in ("train", "test"):
    for side in ("A", "B"):
      (tmp_path / split / side).mkdir(parents=True)
      for i in range(2):
        _write_grey16(tmp_path / split / side / f"{i}.png", levels if side == "A" else 65535 - levels)
  config = _config(tmp_path, input_nc=1, output_nc=1, preprocess="crop", no_flip=True)
  batch = _batches(config, 1)[0]
  assert batch["A"].shape == batch["B"].shape == (2, 32, 32, 1)
  np.testing.assert_allclose(batch["A"][0, ..., 0], levels / 32767.5 - 1, atol=1e-6)
  np.testing.assert_allclose(batch["B"][0, ..., 0], (65535 - levels) / 32767.5 - 1, atol=1e-6)
  evaluated = next(input_pipeline.make_eval_dataset(config).as_numpy_iterator())
  np.testing.assert_allclose(evaluated["A"][0, ..., 0], levels / 32767.5 - 1, atol=1e-6)


def test_a_sixteen_bit_file_among_eight_bit_ones_is_named(folder):
  _write_grey16(folder / "train" / "9.png", np.zeros((20, 40)))
  with pytest.raises(ValueError, match=r"Image .*train/9.png is 16-bit but .*train/0.png in the same folder is "
                                       r"8-bit: the images of a folder share one bit depth"):
    input_pipeline.make_train_dataset(_config(folder))


def test_rgb_pairs_feed_a_grey_model_its_luma(folder):
  batch = _batches(_config(folder, input_nc=1), 1)[0]
  assert batch["A"].shape == (2, 32, 32, 1) and batch["B"].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(batch["A"] + batch["B"][..., :1], 0.0, atol=0.02)  # grey A is still B's negative


def test_eval_batches_hold_images_of_one_size_and_every_image_once(tmp_path):
  _write_pairs(tmp_path, "test", 3, height=40, width=90)
  for i in (3, 4):
    Image.fromarray(_pair(i, height=70, width=180)).save(tmp_path / "test" / f"{i}.png")
  batches = list(input_pipeline.make_eval_dataset(_config(tmp_path, preprocess="none"), batch_size=2)
                 .as_numpy_iterator())
  shapes = [b["A"].shape for b in batches]
  assert sorted(shapes) == [(1, 40, 45, 3), (2, 40, 45, 3), (2, 70, 90, 3)]
  assert sorted(i for b in batches for i in b["index"]) == [0, 1, 2, 3, 4]
  for b in batches:
    assert [f.decode() for f in b["filename"]] == [f"{i}.png" for i in b["index"]]
    assert _indices(b["A"]) == list(b["index"])


def test_colorization_reads_photos_as_l_in_and_ab_out(tmp_path):
  """A red photo: L = 53.24 -> 0.065, ab = (80.09, 67.20) / 110, as the reference's colorization dataset."""
  (tmp_path / "train").mkdir()
  for i in range(2):
    Image.fromarray(np.full((40, 44, 3), (255, 0, 0), np.uint8)).save(tmp_path / "train" / f"{i}.jpg", quality=100)
  config = _config(tmp_path, dataset_mode="colorization", input_nc=1, output_nc=2)
  batch = _batches(config, 1)[0]
  assert batch["A"].shape == (2, 32, 32, 1) and batch["B"].shape == (2, 32, 32, 2)
  np.testing.assert_allclose(batch["A"], 53.24 / 50 - 1, atol=0.02)
  np.testing.assert_allclose(batch["B"][..., 0], 80.09 / 110, atol=0.03)
  np.testing.assert_allclose(batch["B"][..., 1], 67.20 / 110, atol=0.03)
