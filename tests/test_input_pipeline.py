"""The tf.data pipeline: layouts, preprocessing, the resumable host-sharded stream, errors."""

import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from p2p_jax import input_pipeline
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


@pytest.mark.parametrize("preprocess", ["resize_and_crop", "crop", "scale_width", "none"])
def test_every_preprocess_mode_yields_crop_size(tmp_path, preprocess):
  _write_pairs(tmp_path, "train", 2, height=40, width=90)
  assert _batches(_config(tmp_path, preprocess=preprocess), 1)[0]["A"].shape == (2, 32, 32, 3)


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
  a, b = input_pipeline._decode_pair(encoded, tf.constant(b""), side_by_side=True, direction="AtoB")
  expected_a, expected_b = ref.split_ab(Image.open(path))
  np.testing.assert_array_equal(a, np.asarray(expected_a))
  np.testing.assert_array_equal(b, np.asarray(expected_b))
  assert b.shape == (20, 21, 3) and np.all(np.asarray(b)[:, -1] == 255)


@pytest.mark.parametrize("preprocess, size", [("resize_and_crop", (53, 41)), ("crop", (50, 44))])
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
  resized = (config.load_size, config.load_size) if preprocess == "resize_and_crop" else a.shape[:2]
  top, left, flip = (int(v) for v in input_pipeline.jitter_params(*resized, config, seed))
  params = {"crop_pos": (left, top), "flip": bool(flip)}
  for ours, image in ((ours_a, a), (ours_b, b)):
    theirs = ref.reference_transform(Image.fromarray(image), params, preprocess, config.load_size,
                                     config.crop_size)
    assert ours.shape == theirs.shape == (32, 32, 3)
    error = np.abs(np.asarray(input_pipeline._to_unit_range(ours)) - theirs)
    assert error.mean() < 0.02 and error.max() < 0.25, (error.mean(), error.max())
