"""tuning: "auto" convolutions run the formulation measured fastest here, per shape, else the static table."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import cache, layers, runtime, trainer, tuning
from tests.conftest import run_config, tiny_pix2pix


_VARIANTS = tuning._variants  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
  """A fresh record file per test, no choices carried over from other tests, and XLA's default
  compiler options alone unless a test brings back the variants (``_VARIANTS``)."""
  monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(tuning, "_variants", dict)
  tuning.reset()
  yield
  tuning.reset()


# Timings per tuning of the tiny step: 6 convolutions with 5 formulations; the PatchGAN's stride-1 4x4
# layer with 3 (XLA's, Winograd's and the default, per-tap products: im2col keeps more) and its 1-channel
# last layer with 2 (XLA's and the default, output-side matmul: no per-tap products or Winograd there);
# 5 transposed with 3.
_CALLS = 6 * 5 + 3 + 2 + 5 * 3


def _batch(size=32, batch=1):
  image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return {"A": image, "B": image}


def _name(formulation, site):
  return next(name for name, f in site.formulations.items() if f is formulation)


def _timer_preferring(fastest, calls=None):
  """A fake timer: 1 ms for the formulation ``fastest[kind]`` of a site, 10 ms for any other."""
  def timer(formulation, site, limit_ms, compiler_options=None):
    del limit_ms, compiler_options
    if calls is not None:
      calls.append(site.key)
    return 1.0 if _name(formulation, site) == fastest[site.key.split()[0]] else 10.0
  return timer


def test_sites_are_the_steps_auto_convolutions_with_their_shapes():
  sites = tuning.step_sites(tiny_pix2pix(), _batch())
  # The 5-level U-Net: 5 convolutions down, 5 transposed up; the 2-layer PatchGAN: 4 convolutions,
  # its second of the shape of the U-Net's down_1, so one site.
  assert sum(key.startswith("conv 1x32x32x3 ") for key in sites) == 1  # down_0
  assert "conv 1x32x32x6 k4x4x6x8 s2 p1 float32" in sites  # The PatchGAN's first layer sees both images.
  assert sum(key.startswith("upconv ") for key in sites) == 5
  assert sum(key.startswith("conv ") for key in sites) == 5 + 3
  down_0 = sites["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  assert set(down_0.formulations) == {"xla", "matmul", "strided", "strided_matmul", "winograd"}
  assert down_0.default == "matmul"
  assert down_0.flops == 2 * 1 * 16 * 16 * (4 * 4 * 3 * 8)
  assert tuning.step_sites(tiny_pix2pix(conv_impl="xla", upconv_impl="matmul"), _batch()) == {}


def test_every_formulation_of_a_site_computes_the_layer():
  rng = np.random.default_rng(0)
  for site in tuning.step_sites(tiny_pix2pix(), _batch()).values():
    x, kernel = (rng.standard_normal(s.shape, np.float32) for s in (site.x, site.kernel))
    outputs = [jax.jit(f)(x, kernel) for f in site.formulations.values()]
    for output in outputs[1:]:
      np.testing.assert_allclose(output, outputs[0], atol=1e-4, rtol=1e-4)


def test_tune_records_the_fastest_and_the_layers_run_it(tmp_path):
  pix2pix, batch = tiny_pix2pix(), _batch()
  generator_text = lambda: jax.jit(lambda v, x: pix2pix.generator.apply(v, x, train=False)).lower(
      variables, batch["A"]).as_text()
  variables = pix2pix.generator.init(jax.random.key(0), jnp.zeros(batch["A"].shape), train=False)
  assert "lhs_dilate" not in generator_text()  # The static table: matmul transposed convolutions.

  fastest = {"conv": "xla", "upconv": "conv_transpose"}
  chosen = tuning.tune(pix2pix, batch, min_flops=0, timer=_timer_preferring(fastest))
  assert len(chosen) == 13 and set(chosen.values()) == {"xla", "conv_transpose"}
  assert "lhs_dilate = [2, 2]" in generator_text()  # XLA's own transposed convolution now runs.

  record = json.loads(tuning.record_path().read_text())
  assert tuning.record_path().parent == tmp_path / "cache" / "tuning"
  assert record["jax"] == jax.__version__ and len(record["sites"]) == 13
  down_0 = record["sites"]["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  assert down_0["choice"] == "xla" and down_0["ms"] == {"matmul": 10.0, "strided": 10.0, "strided_matmul": 10.0,
                                                        "winograd": 10.0, "xla": 1.0}
  assert set(down_0["kept_mib"]) == {"matmul", "strided", "strided_matmul", "winograd", "xla"}
  tuning.reset()  # A new process reads the choices from the record.
  assert "lhs_dilate = [2, 2]" in generator_text()


def test_shapes_measured_before_are_not_measured_again():
  calls = []
  timer = _timer_preferring({"conv": "xla", "upconv": "matmul"}, calls)
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=timer)
  assert len(calls) == _CALLS  # Each formulation of each site, once.
  calls.clear()
  tuning.reset()
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=timer)
  assert calls == []
  tuning.tune(tiny_pix2pix(), _batch(batch=4), min_flops=0, timer=timer)
  # Another batch is another shape: each formulation on one example, then those not far slower than the
  # default on the batch: all but the transposed convolutions' XLA and Winograd formulations (10 ms against 1).
  assert len(calls) == _CALLS + (_CALLS - 5 * 2)


def test_small_layers_keep_the_static_default():
  calls = []
  sites = tuning.step_sites(tiny_pix2pix(), _batch())
  assert tuning.tune(tiny_pix2pix(), _batch(), timer=_timer_preferring({"conv": "xla"}, calls)) == {}
  assert calls == [] and max(s.flops for s in sites.values()) < tuning.MIN_FLOPS
  assert all(tuning.choice(s) == s.default for s in sites.values())


def test_the_default_stays_unless_another_is_clearly_faster():
  site = tuning.step_sites(tiny_pix2pix(), _batch())["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  timer = lambda times: lambda f, s, limit: times[_name(f, s)]
  close = {"matmul": 10.0, "xla": 9.7, "strided": 9.8, "strided_matmul": 9.9, "winograd": 9.9}
  assert tuning.measure(site, timer(close))["choice"] == "matmul"
  clear = {"matmul": 10.0, "xla": 9.4, "strided": 9.8, "strided_matmul": 9.9, "winograd": 9.9}
  measured = tuning.measure(site, timer(clear))
  assert measured["choice"] == "xla" and measured["ms"] == {"matmul": 10.0, "strided": 9.8, "strided_matmul": 9.9,
                                                            "winograd": 9.9, "xla": 9.4}


def test_a_formulation_that_keeps_more_for_the_backward_pass_is_not_a_candidate():
  """At 64 px the static choice is strided_conv (keeps its input); an im2col matmul keeps 4x that,
  strided_conv_matmul no more than strided_conv (it builds the patches again for the backward pass), nor
  Winograd (its transformed input computed again)."""
  site = tuning.step_sites(tiny_pix2pix(), _batch(size=64))["conv 1x64x64x3 k4x4x3x8 s2 p1 float32"]
  assert site.default == "strided"
  timed = []

  def prefer_matmul(formulation, traced, limit_ms):
    timed.append(_name(formulation, traced))
    return 1.0 if timed[-1] == "matmul" else 10.0
  measured = tuning.measure(site, prefer_matmul)
  assert measured["choice"] == "strided" and sorted(timed) == ["strided", "strided_matmul", "winograd", "xla"]
  kept = measured["kept_mib"]
  assert kept["matmul"] > 3 * kept["strided"]
  assert kept["xla"] == kept["strided"] == kept["strided_matmul"] == kept["winograd"]
  assert kept["strided"] == round((64 * 64 * 3 + 4 * 4 * 3 * 8) * 4 / 2 ** 20, 3)  # The input and the kernel.


def test_a_far_slower_formulation_is_cut_off_after_one_call():
  site = tuning.step_sites(tiny_pix2pix(), _batch())["upconv 1x1x1x64 k64x4x4x64 s2 p1 float32"]
  limits = {}

  def timer(formulation, traced, limit_ms):
    limits[_name(formulation, traced)] = limit_ms
    return 3.0
  tuning.measure(site, timer)
  assert limits == {"matmul": float("inf"), "conv_transpose": 6.0, "winograd": 6.0}


def test_the_real_timer_times_forward_and_both_gradients():
  site = tuning.step_sites(tiny_pix2pix(), _batch())["conv 1x16x16x8 k4x4x8x16 s2 p1 float32"]
  result = tuning.measure(site)
  assert set(result["ms"]) == {"xla", "matmul", "strided", "strided_matmul", "winograd"}
  assert result["choice"] in result["ms"]
  assert all(0 < ms < 10_000 for ms in result["ms"].values())


@pytest.mark.parametrize("damage", ["not json", '{"version": 1}', "other jax"])
def test_a_damaged_or_stale_record_is_measured_again_and_replaced(damage):
  calls = []
  timer = _timer_preferring({"conv": "xla", "upconv": "matmul"}, calls)
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=timer)
  path = tuning.record_path()
  if damage == "other jax":
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, jax="0.0.1")))
  else:
    path.write_text(damage)
  tuning.reset()
  site = tuning.step_sites(tiny_pix2pix(), _batch())["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  assert tuning.choice(site) == "matmul"  # The static default, not a stale or broken record.
  calls.clear()
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=timer)
  assert len(calls) == _CALLS
  assert json.loads(path.read_text())["jax"] == jax.__version__


def test_opting_out_of_cpu_tuning_keeps_the_static_table(monkeypatch):
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=_timer_preferring({"conv": "xla", "upconv": "matmul"}))
  monkeypatch.setenv("P2P_JAX_CPU_TUNING", "0")
  tuning.reset()
  site = tuning.step_sites(tiny_pix2pix(), _batch())["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  assert tuning.choice(site) == "matmul"


def test_with_caching_off_the_choices_last_for_the_process(monkeypatch):
  monkeypatch.setenv(cache.ENV, "off")
  chosen = tuning.tune(tiny_pix2pix(), _batch(), min_flops=0,
                       timer=_timer_preferring({"conv": "xla", "upconv": "matmul"}))
  assert tuning.record_path() is None and set(chosen.values()) == {"xla", "matmul"}
  site = tuning.step_sites(tiny_pix2pix(), _batch())["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  assert tuning.choice(site) == "xla"


def test_training_tunes_its_global_batch_before_it_builds_anything(tmp_path, synthetic_dir, monkeypatch):
  tuned, step_timers = [], []

  def tune(pix2pix, batch, step_timer=None):
    tuned.append({name: image.shape for name, image in batch.items()})
    step_timers.append(step_timer)
    raise InterruptedError("stop here")
  monkeypatch.setattr(tuning, "tune", tune)
  with pytest.raises(InterruptedError, match="stop here"):
    trainer.train_and_evaluate(run_config(synthetic_dir, num_train_steps=1), tmp_path / "run")
  assert tuned == [{"A": (4, 32, 32, 3), "B": (4, 32, 32, 3)}]  # run_config's global batch of 4.
  assert callable(step_timers[0])  # The layers' choices are checked on the whole step.

  monkeypatch.setenv("P2P_JAX_CPU_TUNING", "0")  # Opted out: nothing is measured.
  monkeypatch.setattr(trainer.checkpoint, "make_manager", lambda *_, **__: tune(None, {}))
  with pytest.raises(InterruptedError, match="stop here"):
    trainer.train_and_evaluate(run_config(synthetic_dir, num_train_steps=1), tmp_path / "opted_out")
  assert tuned[1:] == [{}]  # Only the stand-in for the checkpoint manager ran.


def test_layers_with_an_explicit_impl_ignore_the_measurements():
  tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, timer=_timer_preferring({"conv": "xla", "upconv": "matmul"}))
  x = jnp.zeros((2, 32, 32, 3))
  module = layers.Conv(8, 4, 2, 1, use_bias=False, impl="matmul")
  text = jax.jit(module.init).lower(jax.random.key(0), x).as_text()
  assert "convolution" not in text


def test_a_batch_runs_only_the_formulations_not_far_slower_on_one_example():
  site = tuning.step_sites(tiny_pix2pix(), _batch(batch=2))["upconv 2x8x8x32 k32x4x4x8 s2 p1 float32"]
  timed = []

  def timer(formulation, traced, limit_ms):
    name = _name(formulation, traced)
    timed.append((name, traced.x.shape[0]))
    return {"matmul": 1.0, "conv_transpose": 2.5, "winograd": 2.5}[name] * traced.x.shape[0]
  measured = tuning.measure(site, timer)
  assert measured["choice"] == "matmul" and measured["ms"] == {"matmul": 2.0}
  assert timed == [("matmul", 1), ("conv_transpose", 1), ("winograd", 1), ("matmul", 2)]


def test_bfloat16_says_when_float32_is_faster_here(caplog):
  pix2pix = tiny_pix2pix(dtype="bfloat16")
  in_bf16 = lambda slower: lambda f, site, limit: (slower if site.x.dtype == jnp.bfloat16 else 1.0)
  with caplog.at_level("WARNING"):
    chosen = tuning.tune(pix2pix, _batch(), min_flops=0, timer=in_bf16(1.5))
  assert all(key.endswith(" bfloat16") for key in chosen) and len(chosen) == 13
  record = json.loads(tuning.record_path().read_text())["sites"]
  assert len(record) == 26  # The same layers in float32, measured beside them.
  assert ("convolutions of this step run 1.50x slower in bfloat16 than in float32 (19.5 against 13.0 ms, "
          "measured layer by layer): config.model.dtype=float32 is faster here") in caplog.text

  caplog.clear()
  tuning.reset()
  record_path = tuning.record_path()
  record_path.unlink()
  with caplog.at_level("WARNING"):
    tuning.tune(pix2pix, _batch(), min_flops=0, timer=in_bf16(0.5))
  assert "slower in bfloat16" not in caplog.text


@pytest.mark.parametrize("measured_s, static_s, kept", [(0.2, 0.1, "static"), (0.1, 0.2, "measured"),
                                                         (0.099, 0.1, "static")])
def test_the_whole_step_keeps_the_static_table_unless_the_measured_choices_make_it_faster(
    measured_s, static_s, kept):
  pix2pix, batch = tiny_pix2pix(), _batch()
  sites = tuning.step_sites(pix2pix, batch)
  down_0 = sites["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  compiled = []

  def step_timer(options):  # A step "compiled" now runs what the layers trace now.
    assert options == {}
    compiled.append(tuning.choice(down_0))
    took = measured_s if compiled[-1] == "xla" else static_s
    return lambda: took

  timer = _timer_preferring({"conv": "xla", "upconv": "conv_transpose"})
  measured = tuning.tune(pix2pix, batch, min_flops=0, timer=timer)  # The layers alone.
  tuning.reset()
  static = {key: sites[key].default for key in measured}
  assert measured != static
  chosen = tuning.tune(pix2pix, batch, min_flops=0, timer=timer, step_timer=step_timer)
  assert compiled == ["xla", "matmul"]  # Each candidate step traced with its own choices.
  assert chosen == (measured if kept == "measured" else static)
  assert tuning.choice(down_0) == chosen[down_0.key]  # What the layers run from now on.
  (verdict,) = json.loads(tuning.record_path().read_text())["steps"].values()
  assert verdict == {"choice": kept, "ms": {"measured": 1000 * measured_s, "static": 1000 * static_s}}
  tuning.reset()
  assert tuning.tune(pix2pix, batch, min_flops=0, timer=timer, step_timer=step_timer) == chosen
  assert compiled == ["xla", "matmul"]  # Checked once per machine and choices.


@pytest.mark.parametrize("measured_later_s, kept, calls", [(0.09, "measured", 7), (0.097, "static", 10)])
def test_a_whole_step_check_within_the_margin_times_more_calls_before_it_decides(measured_later_s, kept, calls):
  """Three calls at a noisy moment kept the static table for a step the measured choices ran 0.90-0.94x of."""
  pix2pix, batch = tiny_pix2pix(), _batch()
  down_0 = tuning.step_sites(pix2pix, batch)["conv 1x32x32x3 k4x4x3x8 s2 p1 float32"]
  made = {"xla": 0, "matmul": 0}  # Calls of the measured choices' step and of the static table's.

  def step_timer(options):
    name = tuning.choice(down_0)

    def run():
      made[name] += 1
      if name == "matmul":
        return 0.1
      return 0.097 if made[name] <= 1 + tuning._STEP_CALLS else measured_later_s  # 3% faster at first.
    return run

  timer = _timer_preferring({"conv": "xla", "upconv": "conv_transpose"})
  chosen = tuning.tune(pix2pix, batch, min_flops=0, timer=timer, step_timer=step_timer)
  assert chosen[down_0.key] == ("xla" if kept == "measured" else "matmul")
  assert made == {"xla": calls, "matmul": calls}  # One untimed call each, then rounds of three.


def test_no_whole_step_check_when_the_choices_are_the_static_table():
  def step_timer(options):
    raise AssertionError("the whole step was timed")
  chosen = tuning.tune(tiny_pix2pix(), _batch(), min_flops=0, step_timer=step_timer,
                       timer=_timer_preferring({"conv": "matmul", "upconv": "matmul"}))
  sites = tuning.step_sites(tiny_pix2pix(), _batch())
  assert chosen and all(name == sites[key].default for key, name in chosen.items())


def test_without_ynnpack_convolutions_xla_runs_its_own():
  """The variant's premise: XLA:CPU hands a convolution to YNNPACK by default, and not with its options."""
  (options,) = _VARIANTS().values()
  step = jax.jit(lambda x, kernel: layers.conv_xla(x, kernel, 2, 1)).lower(
      jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32), jax.ShapeDtypeStruct((4, 4, 32, 64), jnp.float32))
  assert step.compile().as_text().count('"__ynn_fusion"') == 1
  assert step.compile(options).as_text().count('"__ynn_fusion"') == 0


def test_options_this_xla_does_not_take_are_left_out(monkeypatch):
  monkeypatch.setattr(tuning, "_VARIANTS", {"cpu": {"bogus": {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH"}}})
  assert _VARIANTS.__wrapped__() == {}


def test_without_ynnpack_convolutions_the_formulations_without_xlas_convolutions_compile_the_same():
  """Why a variant times only the formulations that run XLA's own convolutions: the others are the same program."""
  (options,) = _VARIANTS().values()
  site = layers.conv_site(jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32), (4, 4, 32, 64), 2, 1, jnp.float32)
  convolving = tuning._convolving(site)  # pylint: disable=protected-access
  assert convolving == {"xla", "strided"} and {"matmul", "strided_matmul", "winograd"} <= set(site.formulations)
  program = lambda f, compiler_options: jax.jit(jax.grad(lambda x, k: f(x, k).sum(), (0, 1))).lower(
      site.x, site.kernel).compile(compiler_options).as_text()
  for name, f in site.formulations.items():
    with_options, with_defaults = (program(f, compiler_options) for compiler_options in (options, None))
    assert (with_options == with_defaults) == (name not in convolving), name


def test_a_variant_times_only_the_formulations_that_run_xlas_convolutions(monkeypatch):
  monkeypatch.setattr(tuning, "_variants", _VARIANTS)
  ((variant, _),) = _VARIANTS().items()
  timed = []

  def timer(formulation, site, limit_ms, compiler_options=None):
    del limit_ms
    timed.append((site.key, _name(formulation, site), bool(compiler_options)))
    return 10.0 if compiler_options else 20.0

  pix2pix, batch = tiny_pix2pix(), _batch()
  tuning.tune(pix2pix, batch, min_flops=0, timer=timer)
  convolving = {key: tuning._convolving(s) for key, s in tuning.step_sites(pix2pix, batch).items()}  # pylint: disable=protected-access
  with_variant = [(key, name) for key, name, options in timed if options]
  assert with_variant and all(name in convolving[key] for key, name in with_variant)
  records = json.loads(tuning.record_path().read_text())["sites"]
  for key in {key for key, _ in with_variant}:  # The others' times are those compiled with XLA's defaults.
    assert all(ms == (10.0 if other in convolving[key] else records[key]["ms"][other])
               for other, ms in records[f"{key}, {variant}"]["ms"].items())


def _timer_by_options(ms):
  """A fake timer: ``ms[(formulation, compiled with a variant's options)]``, else 10 ms."""
  def timer(formulation, site, limit_ms, compiler_options=None):
    del limit_ms
    return ms.get((_name(formulation, site), bool(compiler_options)), 10.0)
  return timer


@pytest.mark.parametrize("xla_with_variant_ms, variant_kept", [(0.5, True), (6.0, False)])
def test_the_step_takes_the_compiler_options_whose_layers_add_up_fastest(monkeypatch, xla_with_variant_ms,
                                                                          variant_kept):
  monkeypatch.setattr(tuning, "_variants", _VARIANTS)
  ((variant, options),) = _VARIANTS().items()
  pix2pix, batch = tiny_pix2pix(), _batch()
  timer = _timer_by_options({("matmul", False): 1.0, ("matmul", True): 1.0, ("xla", False): 5.0,
                             ("xla", True): xla_with_variant_ms})
  compiled = []

  def step_timer(step_options):
    compiled.append(step_options)
    return lambda: 0.1 if step_options else 0.2

  chosen = tuning.tune(pix2pix, batch, min_flops=0, timer=timer, step_timer=step_timer)
  sites = tuning.step_sites(pix2pix, batch)
  records = json.loads(tuning.record_path().read_text())["sites"]
  convolving = [key for key, s in sites.items() if "xla" in s.formulations]
  assert convolving and all(f"{key}, {variant}" in records for key in convolving)  # Measured both ways.
  if variant_kept:
    assert all(chosen[key] == "xla" for key in convolving)
    assert compiled == [options, {}]  # The measured choices with the variant's options, the static table without.
    assert tuning.compiler_options() == {**runtime.compiler_options(), **options}
  else:
    assert compiled and options not in compiled  # Every step checked compiled with XLA's defaults.
    assert tuning.compiler_options() == runtime.compiler_options()
  tuning.reset()
  assert tuning.compiler_options() == runtime.compiler_options()
