"""What ``impl="auto"`` runs: each convolution's formulation, measured on this machine for its shape.

A convolution can run as XLA's own op or as a matmul (``layers``), and which is
faster depends on the CPU, the image side, the batch and the dtype: a table
measured on one machine lost on another (BENCHMARKS.md). So ``tune`` finds
every ``layers.Conv`` and ``layers.ConvTranspose`` with ``impl="auto"`` that the
networks call for a batch of a given shape (from shapes alone), times each
formulation that can run it and keeps no more memory for the backward pass
than the static table's choice (forward and both gradients, jitted, fastest of
several calls), and records the fastest per layer shape in
``<cache>/tuning/<machine>.json`` (``cache.root()``, one file per CPU model and
instruction set, or accelerator kind). A layer timed alone does not always
predict the step around it, so where the choices differ from the static table
the whole train step is then timed both ways, and the table's stay unless the
measured ones make the step clearly faster (``_check_whole_step``). Compiler
options are chosen the same way: on CPU, the formulations that run XLA's own
convolutions are measured again with YNNPACK's convolutions off
(``_VARIANTS``; the others compile to the same program, so their times stand),
and the step compiles with the options under which its layers add up fastest
(``compiler_options``). Layers
look their shape up there when they are traced (``choice``); a shape never
measured, or a process with ``P2P_JAX_CPU_TUNING=0``, gets the static table in
``layers`` (the safe default).
``experiments.train`` tunes before it compiles, once per machine and shape.

Layers whose forward pass is under ``MIN_FLOPS`` are not measured: they take
well under a millisecond, and noise would decide. Every formulation computes
the same function (``tests/test_layers.py``), so a choice changes the speed,
not the model; a user who wants one formulation everywhere sets
``config.model.conv_impl`` / ``upconv_impl``.
"""

import dataclasses
import functools
import hashlib
import json
import math
import re
import statistics
import time
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from p2p_jax import cache, runtime

MIN_FLOPS = 10 ** 8
_VERSION = 12  # 2: only formulations that keep no more memory than the default compete.
# 3: bf16 on CPU: every product bf16 and row-major, XLA's convolutions in float32 (layers.matmul).
# 4: strided convolutions may run all three products as matmuls (layers.strided_conv_matmul).
# 5: stride-1 convolutions may run as one product per kernel tap (layers.conv_taps).
# 6: bf16 on CPU: patches and padded inputs moved as bits (faster); no taps where matmul takes the output side.
# 7: conv_taps' kernel gradient from one transposed input (faster); the static table runs output-side
#    convolutions as matmul at every side (the whole-step check compares against it).
# 8: on CPU, layers are measured also without YNNPACK's convolutions, and the step may compile so.
# 9: strided_conv_matmul's kernel gradient builds its own patches (XLA had kept the forward pass's).
# 10: stride-2 patches from the input's phases, written once (layers._phase_patches, faster).
# 11: float32 4x4 convolutions and transposed convolutions may run in Winograd's F(2x2, 2x2) (layers.conv_winograd).
# 12: Winograd's layers, and strided convolutions' gradients, run a large batch in chunks (layers._in_chunks):
#     less memory, as fast (in bf16 at batch 16, 5% slower: chunked patches).
# A formulation replaces the static choice only when it is at least this much faster.
_MARGIN = 0.05
# A candidate whose first timed call is this many times the fastest so far is dropped untimed further.
_CUTOFF = 2.0
# Timed calls of each whole step in the check of the measured choices against the static table; up to
# _UNDECIDED_STEP_CALLS when the measured choices come out faster, but by less than _MARGIN: three calls at
# a noisy moment kept the static table for a step the measured choices run 0.90-0.94x of (BENCHMARKS.md).
_STEP_CALLS = 3
_UNDECIDED_STEP_CALLS = 9
# Part of each whole-step verdict's key, raised when the check changes: 2, undecided steps timed longer.
_STEP_CHECK = 2
# Compiler options a train step may compile with instead of XLA's defaults, by backend; measured
# like the formulations. XLA:CPU hands its convolutions to YNNPACK, whose kernels ran a batch-16
# step's convolution kernel gradients up to 4x slower than XLA's own and were faster at batch 1
# (BENCHMARKS.md); the value is XLA's default list of library fusions less the convolutions.
XLA_DEFAULTS = "XLA's defaults"
_VARIANTS = {"cpu": {"no YNNPACK convolutions": {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}}}


@dataclasses.dataclass(frozen=True)
class Site:
  """One convolution as traced: its shapes, and the formulations that compute it (``name -> f(x, kernel)``)."""
  key: str
  x: jax.ShapeDtypeStruct
  kernel: jax.ShapeDtypeStruct
  formulations: Mapping[str, Callable]
  default: str  # The static table's choice.
  flops: int  # Of the forward pass.

  def in_float32(self) -> "Site":
    """The same convolution in float32."""
    as_float32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32)
    return dataclasses.replace(self, key=f"{self.key.rsplit(' ', 1)[0]} float32", x=as_float32(self.x),
                               kernel=as_float32(self.kernel))


def site(kind: str, x, kernel_shape: Sequence[int], stride: int, padding: int, dtype,
         formulations: Mapping[str, Callable], default: str) -> Site:
  """The ``Site`` of a convolution of ``kind`` ("conv" or "upconv") applied to ``x``."""
  dtype = jnp.dtype(dtype)
  shape = lambda s: "x".join(map(str, s))
  key = f"{kind} {shape(x.shape)} k{shape(kernel_shape)} s{stride} p{padding} {dtype.name}"
  if kind == "upconv":  # Every input pixel times the (in, kh * kw * out) kernel.
    flops = 2 * math.prod(x.shape[:3]) * math.prod(kernel_shape)
  else:  # Every output pixel times the (kh * kw * in, out) kernel.
    rows, columns = ((side + 2 * padding - k) // stride + 1 for side, k in zip(x.shape[1:3], kernel_shape[:2]))
    flops = 2 * x.shape[0] * rows * columns * math.prod(kernel_shape)
  return Site(key, jax.ShapeDtypeStruct(x.shape, dtype), jax.ShapeDtypeStruct(tuple(kernel_shape), dtype),
              dict(formulations), default, flops)


# Choices known to this process: the record file's (read once), then what tune() measured.
_choices: Optional[Dict[str, str]] = None
# The compiler options tune() chose for the step, beyond runtime.compiler_options(): {} for XLA's defaults.
_step_options: Dict[str, str] = {}


def record_path():
  """This machine's record file, or None when caching is off."""
  base = cache.root()
  if base is None:
    return None
  name = cache.machine_key()
  if jax.default_backend() != "cpu":
    device = re.sub(r"[^A-Za-z0-9]+", "-", jax.devices()[0].device_kind).strip("-")
    name = f"{jax.default_backend()}-{device}-{name}"
  return base / "tuning" / f"{name}.json"


def _read_file() -> dict:
  """This machine's record file as written by this version of p2p_jax and JAX; {} if none or unusable."""
  path = record_path()
  if path is None:
    return {}
  try:
    data = json.loads(path.read_text())
    if data["version"] != _VERSION or data["jax"] != jax.__version__:
      return {}  # Another JAX may rank the formulations differently: measure again.
  except (OSError, ValueError, TypeError, KeyError):  # None, damaged or of another layout.
    return {}
  return data


def _sites_in(data: dict) -> Dict[str, dict]:
  """``{site key: measure()'s result}`` from a record file's contents; {} if unusable."""
  try:
    return {str(key): {"choice": str(value["choice"]), "ms": dict(value["ms"]),
                       "kept_mib": dict(value["kept_mib"])} for key, value in data["sites"].items()}
  except (ValueError, TypeError, KeyError, AttributeError):
    return {}


def _steps_in(data: dict) -> Dict[str, dict]:
  """``{step key: {"choice": "measured" or "static", "ms": {...}}}``: the whole-step checks in a record file."""
  try:
    return {str(key): {"choice": str(value["choice"]), "ms": dict(value["ms"])}
            for key, value in data.get("steps", {}).items()}
  except (ValueError, TypeError, KeyError, AttributeError):
    return {}


def _read_records() -> Dict[str, dict]:
  """The sites measured on this machine; {} if none or unusable."""
  return _sites_in(_read_file())


def _known() -> Dict[str, str]:
  global _choices
  if _choices is None:
    _choices = ({key: value["choice"] for key, value in _read_records().items()}
                if runtime.enabled() else {})
  return _choices


def choice(traced: Site) -> str:
  """The formulation to run for ``traced``: the one measured fastest here, else the static default."""
  name = _known().get(traced.key)
  return name if name in traced.formulations else traced.default


def reset() -> None:
  """Forgets the choices this process knows; the next ``choice`` reads the record file again."""
  global _choices
  _choices = None
  _step_options.clear()


def step_options() -> dict:
  """The compiler options ``tune`` chose for the step: {} for XLA's defaults."""
  return dict(_step_options)


def compiler_options() -> dict:
  """What a train step compiles with: ``runtime.compiler_options()`` and ``step_options()``."""
  return {**runtime.compiler_options(), **_step_options}


@functools.lru_cache(maxsize=None)
def _variants() -> Dict[str, dict]:
  """This backend's ``_VARIANTS`` that this XLA accepts (an option renamed in another version is left out)."""
  accepted = {}
  for name, options in _VARIANTS.get(jax.default_backend(), {}).items():
    try:
      jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError:
      logging.info("This XLA does not take %s; its steps compile with XLA's defaults.", options)
      continue
    accepted[name] = options
  return accepted


def _convolving(traced: Site) -> FrozenSet[str]:
  """The formulations of ``traced`` that run one of XLA's own convolutions (forward or gradients)."""
  def forward_and_gradients(x, kernel, formulation):
    y, vjp = jax.vjp(formulation, x, kernel)
    return vjp(y)
  return frozenset(name for name, f in traced.formulations.items()
                   if "conv_general_dilated" in str(jax.make_jaxpr(functools.partial(
                       forward_and_gradients, formulation=f))(traced.x, traced.kernel)))


def collect(fn: Callable, *args, **kwargs) -> Dict[str, Site]:
  """Every ``impl="auto"`` convolution ``fn(*args, **kwargs)`` calls, by key; traced on shapes only.

  A module takes part if it has a ``tuning_site(x)`` method returning a ``Site``
  (or None when it has nothing to choose), as ``layers.Conv`` does.
  """
  found = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    site_of = getattr(context.module, "tuning_site", None)
    if context.method_name == "__call__" and site_of is not None and call_args:
      traced = site_of(call_args[0])
      if traced is not None:
        found[traced.key] = traced
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(functools.partial(fn, **kwargs), *args)
  return found


def step_sites(pix2pix, batch) -> Dict[str, Site]:
  """The convolutions of a train step on batches shaped like ``batch`` (``{"A", "B"}``, NHWC)."""
  source = jax.ShapeDtypeStruct(batch["A"].shape, jnp.float32)
  target = jax.ShapeDtypeStruct(batch["B"].shape, jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  sites = collect(pix2pix.generator.init, rngs, source, train=True)
  sites.update(collect(pix2pix.discriminator.init, rngs, source, target, train=True))
  return sites


def step_choices(pix2pix, batch) -> Dict[str, str]:
  """The formulation each convolution of a step on ``batch`` runs, by site key: what tracing it reads here."""
  return {key: choice(traced) for key, traced in sorted(step_sites(pix2pix, batch).items())}


def time_formulation(formulation: Callable, traced: Site, limit_ms: float = math.inf,
                     repeats: int = 5, budget_s: float = 1.0, compiler_options: Optional[dict] = None) -> float:
  """Milliseconds of ``formulation``'s forward pass and both gradients: the fastest of up to ``repeats`` calls.

  Stops after one timed call if that exceeds ``limit_ms`` (returning it), and
  after ``budget_s`` of timed calls (at least two). Compiled with
  ``compiler_options`` where given.
  """
  def forward_and_gradients(x, kernel, cotangent):
    y, vjp = jax.vjp(formulation, x, kernel)
    return y, *vjp(cotangent)

  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], traced.x.shape, traced.x.dtype)
  kernel = 0.02 * jax.random.normal(keys[1], traced.kernel.shape, traced.kernel.dtype)
  output = jax.eval_shape(formulation, traced.x, traced.kernel)
  cotangent = jax.random.normal(keys[2], output.shape, output.dtype)
  run = jax.jit(forward_and_gradients).lower(x, kernel, cotangent).compile(compiler_options)
  jax.block_until_ready(run(x, kernel, cotangent))  # Settles the heap.
  times, spent = [], 0.0
  while len(times) < repeats:
    start = time.perf_counter()
    jax.block_until_ready(run(x, kernel, cotangent))
    times.append(time.perf_counter() - start)
    spent += times[-1]
    if 1000 * times[0] > limit_ms or (len(times) >= 2 and spent > budget_s):
      break
  return 1000 * min(times)


def kept_bytes(formulation: Callable, traced: Site) -> int:
  """Bytes ``formulation``'s forward pass keeps for its backward one: what a train step holds per call."""
  backward = jax.eval_shape(lambda x, kernel: jax.vjp(formulation, x, kernel)[1], traced.x, traced.kernel)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(backward))


def _beats(ms: float, default_ms: float) -> bool:
  """Whether ``ms`` is faster than ``default_ms`` by ``_MARGIN``: what replacing a static choice takes."""
  return ms < (1 - _MARGIN) * default_ms


def measure(traced: Site, timer: Optional[Callable] = None, compiler_options: Optional[dict] = None,
            known_ms: Optional[Mapping[str, float]] = None) -> dict:
  """``{"choice": name, "ms": {name: ms}, "kept_mib": {name: MiB}}`` for the formulations of ``traced``.

  Only formulations that keep no more for the backward pass than the static
  default are timed (the default first): in a whole step those bytes live
  from the forward to the backward pass, so an im2col matmul, which keeps
  patches four times its input, raised the peak by a gigabyte at 512 px
  without making the step faster (BENCHMARKS.md). The fastest wins if it
  beats the default by ``_MARGIN``. One far slower than the fastest so far is
  cut off after one call (its time then only says it lost); for a batch of
  several, one far slower than the default on one example is not run on the
  whole batch (XLA:CPU's transposed convolution takes seconds there).
  Each formulation compiles with ``compiler_options`` where given; those in
  ``known_ms`` are not run again (their times stand, and cut off the others).
  """
  timer = timer or time_formulation
  if compiler_options:
    timer = functools.partial(timer, compiler_options=compiler_options)
  kept = {name: kept_bytes(f, traced) for name, f in traced.formulations.items()}
  names = [traced.default] + sorted(name for name in traced.formulations
                                    if name != traced.default and kept[name] <= kept[traced.default])
  known = {name: known_ms[name] for name in names if name in (known_ms or {})}
  fresh = [name for name in names if name not in known]
  if traced.x.shape[0] > 1 and fresh:
    single = dataclasses.replace(traced, x=jax.ShapeDtypeStruct((1, *traced.x.shape[1:]), traced.x.dtype))
    screen = _time_each(single, list(dict.fromkeys([traced.default, *fresh])), timer)
    fresh = [name for name in fresh if screen[name] <= _CUTOFF * screen[traced.default]]
  ms = _time_each(traced, fresh, timer, known)
  best = min(ms, key=ms.get)
  chosen = best if _beats(ms[best], ms[traced.default]) else traced.default
  return {"choice": chosen, "ms": ms, "kept_mib": {name: round(b / 2 ** 20, 3) for name, b in sorted(kept.items())}}


def _time_each(traced: Site, names: Sequence[str], timer: Callable,
               known: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
  ms = dict(known or {})
  for name in names:
    limit = _CUTOFF * min(ms.values()) if ms else math.inf
    ms[name] = round(float(timer(traced.formulations[name], traced, limit)), 3)
  return ms


def _write_records(measured: Dict[str, dict], steps: Optional[Dict[str, dict]] = None) -> None:
  path = record_path()
  if path is None or not (measured or steps):
    return
  data = _read_file()  # Another process may have recorded others meanwhile.
  records, checked = _sites_in(data), _steps_in(data)
  records.update(measured)
  checked.update(steps or {})
  data = {"version": _VERSION, "jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "sites": dict(sorted(records.items())),
          "steps": dict(sorted(checked.items()))}
  cache.write_json(path, data, "the measured formulations")


def _measure_new(sites: Sequence[Site], records: Dict[str, dict], timer: Optional[Callable],
                 variant: str = XLA_DEFAULTS) -> None:
  """Measures the sites ``records`` lacks, logging each, and adds them to it and to the record file.

  For a ``variant`` of the compiler options, a site's record is ``_variant_key(key, variant)``, and
  only sites with a formulation that runs XLA's own convolutions are measured, only those
  formulations: the variant changes which convolutions go to YNNPACK, so the others compile to the
  same program as with XLA's defaults, and their times there stand (timed again, their noise alone
  could choose the variant).
  """
  key_of = lambda s: _variant_key(s.key, variant)
  todo = [s for s in sites if key_of(s) not in records]
  known = {s.key: {} for s in todo}
  if variant != XLA_DEFAULTS:
    convolving = {s.key: _convolving(s) for s in todo}
    todo = [s for s in todo if convolving[s.key]]
    known = {s.key: {name: ms for name, ms in records.get(s.key, {}).get("ms", {}).items()
                     if name not in convolving[s.key]} for s in todo}
  if not todo:
    return
  logging.info("Measuring the formulations of %d convolution shapes on this machine, compiled with %s (once "
               "per machine and shape; recorded in %s).", len(todo), variant,
               record_path() or "memory only: caching is off")
  options = _variants().get(variant)
  start, measured = time.perf_counter(), {}
  for s in todo:
    measured[key_of(s)] = measure(s, timer, options, known[s.key])
    logging.info("  %s: %s (%s ms)", s.key, measured[key_of(s)]["choice"],
                 ", ".join(f"{name} {ms:g}" for name, ms in measured[key_of(s)]["ms"].items()))
  logging.info("Measured in %.1f s.", time.perf_counter() - start)
  _write_records(measured)
  records.update(measured)


def _variant_key(key: str, variant: str) -> str:
  """A site's record key when measured with a variant of the compiler options."""
  return key if variant == XLA_DEFAULTS else f"{key}, {variant}"


def _step_key(choices: Mapping[str, str], variant: str) -> str:
  """The whole-step check's key: the step's measured sites, what each chose, the compiler options, and
  the check's version."""
  text = "\n".join([*(f"{key}: {name}" for key, name in sorted(choices.items())), variant,
                    f"check {_STEP_CHECK}"])
  return f"step {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _fastest(sites: Mapping[str, Site], records: Dict[str, dict], timer: Optional[Callable]):
  """``(choices, variant)``: the layers' choices under the compiler options whose layers add up fastest.

  Only the formulations that run one of XLA's own convolutions are measured
  again with a variant (``_measure_new``); the others' records stand for both.
  Sites recorded before are not traced again to find out (a run's start).
  """
  best, best_ms = None, math.inf
  for variant in (XLA_DEFAULTS, *_variants()):
    _measure_new(list(sites.values()), records, timer, variant)
    layers = {key: records.get(_variant_key(key, variant), records[key]) for key in sites}
    ms = sum(layer["ms"][layer["choice"]] for layer in layers.values())
    if ms < best_ms:
      best, best_ms = ({key: layer["choice"] for key, layer in layers.items()}, variant), ms
  return best


def _check_whole_step(sites: Mapping[str, Site], chosen: Dict[str, str], variant: str,
                      step_timer: Callable[[dict], Callable[[], float]]):
  """``(chosen, variant)``, or the static table's choices with XLA's defaults if the whole step does
  not run clearly faster with ``chosen`` compiled with ``variant``'s options: a layer timed alone
  does not always predict the step it is part of (BENCHMARKS.md).

  Each candidate step is compiled as the layers trace with its choices, with
  its compiler options (``step_timer(options)``), run once untimed, then
  ``_STEP_CALLS`` times, alternating, and again up to ``_UNDECIDED_STEP_CALLS``
  times while the measured choices are faster by less than ``_MARGIN``; the
  medians are compared with ``_MARGIN``, as a layer's formulations are. The
  verdict is recorded, so each set of choices is checked once per machine.
  """
  static = {key: s.default for key, s in sites.items()}
  if (chosen, variant) == (static, XLA_DEFAULTS):
    return chosen, variant
  key = _step_key(chosen, variant)
  verdict = _steps_in(_read_file()).get(key)
  if verdict is None:
    logging.info("Timing the whole train step with the measured formulations (compiled with %s) and with the "
                 "static table (once per machine and shape).", variant)
    known, runs = _known(), {}
    before = dict(known)
    try:
      for name, choices, options in (("measured", chosen, _variants().get(variant, {})),
                                     ("static", static, {})):
        known.update(choices)
        runs[name] = step_timer(options)
    finally:
      known.clear()
      known.update(before)
    seconds = {name: [] for name in runs}

    def time_calls():
      for _ in range(_STEP_CALLS):
        for name, run in runs.items():
          seconds[name].append(run())

    def median_ms():
      return {name: round(1000 * statistics.median(times), 1) for name, times in seconds.items()}

    for run in runs.values():
      run()  # The first call of each settles the heap.
    time_calls()
    ms = median_ms()
    while (len(seconds["static"]) < _UNDECIDED_STEP_CALLS
           and not _beats(ms["measured"], ms["static"]) and ms["measured"] < ms["static"]):
      time_calls()
      ms = median_ms()
    verdict = {"choice": "measured" if _beats(ms["measured"], ms["static"]) else "static", "ms": ms}
    logging.info("  the whole step: %s (measured formulations %g ms, static table %g ms)",
                 verdict["choice"], ms["measured"], ms["static"])
    _write_records({}, {key: verdict})
  return (chosen, variant) if verdict["choice"] == "measured" else (static, XLA_DEFAULTS)


def tune(pix2pix, batch, *, min_flops: Optional[int] = None, timer: Optional[Callable] = None,
         step_timer: Optional[Callable[[dict], Callable[[], float]]] = None) -> Dict[str, str]:
  """Measures the formulations of ``pix2pix``'s convolutions for batches like ``batch``; returns the choices.

  Sites recorded on this machine before are not measured again; new
  measurements are added to the record file (when caching is on) and take
  effect in this process for everything traced after. With several processes,
  process 0 measures and every process uses its choices, so that all compile
  the same program. Sites with nothing to choose, or under ``min_flops``
  (``MIN_FLOPS``), keep the static default. Where the backend has variants
  of its compiler options (``_VARIANTS``), the layers that run XLA's own
  convolutions are measured with each too, and the step takes the options
  whose layers add up fastest (``compiler_options()`` then includes them).
  For a step in reduced precision
  the float32 layers are measured too, and a warning says when those are
  faster (bf16 without bf16 matrix units). With ``step_timer``
  (``parallel.step_timer``) and one process, the measured choices are then
  checked against the static table on the whole step (``_check_whole_step``).
  ``timer`` (``time_formulation``) is for tests.
  """
  min_flops = MIN_FLOPS if min_flops is None else min_flops
  sites = {key: s for key, s in sorted(step_sites(pix2pix, batch).items())
           if len(s.formulations) > 1 and s.flops >= min_flops}
  known = _known()
  chosen, variant = {}, XLA_DEFAULTS
  if jax.process_index() == 0:
    records = _read_records()
    chosen, variant = _fastest(sites, records, timer)
    reduced = [s for s in sites.values() if s.x.dtype != jnp.float32]
    if reduced:  # Say so when the reduced precision is the slower one here.
      full = [s.in_float32() for s in reduced]
      _measure_new(full, records, timer)
      fastest = lambda group: sum(records[s.key]["ms"][records[s.key]["choice"]] for s in group)
      if fastest(reduced) > fastest(full):
        logging.warning(
            "On this machine the convolutions of this step run %.2fx slower in %s than in float32 (%.1f against "
            "%.1f ms, measured layer by layer): config.model.dtype=float32 is faster here.",
            fastest(reduced) / fastest(full), reduced[0].x.dtype.name, fastest(reduced), fastest(full))
    if step_timer is not None and jax.process_count() == 1:
      chosen, variant = _check_whole_step(sites, chosen, variant, step_timer)
  if jax.process_count() > 1 and sites:
    names = {key: sorted(s.formulations) for key, s in sites.items()}
    variants = [XLA_DEFAULTS, *_variants()]
    index = np.asarray([names[key].index(chosen[key]) if chosen else 0 for key in sites]
                       + [variants.index(variant)], np.int32)
    index = multihost_utils.broadcast_one_to_all(index)
    chosen = {key: names[key][int(i)] for key, i in zip(sites, index[:-1])}
    variant = variants[int(index[-1])]
  known.update(chosen)
  _step_options.clear()
  _step_options.update(_variants().get(variant, {}))
  return chosen
