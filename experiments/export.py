r"""Exports a run's generator for use outside p2p_jax: ONNX, TF SavedModel or StableHLO.

  python -m experiments.export --workdir DIR --format onnx --output model.onnx
  python -m experiments.export --workdir DIR --format saved_model --output model/ --dtype uint8
  python -m experiments.export --workdir DIR --format stablehlo --output model.stablehlo

The model takes ``images`` and returns ``translated`` (a batch of any size),
as the metadata it carries says (p2p_jax.export).
"""

from absl import flags, logging

import experiments
from experiments import cli
from p2p_jax import export, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir (its checkpoints are used).")
flags.DEFINE_integer("step", None, "Checkpoint step to export; the latest by default.")
flags.DEFINE_enum("format", None, export.FORMATS, "onnx (ONNX Runtime), saved_model (TensorFlow, TF "
                  "Serving) or stablehlo (jax.export.deserialize).")
flags.DEFINE_string("output", None, "The file to write (a folder for saved_model).")
flags.DEFINE_enum("mode", "eval", train.GENERATE_MODES,
                  "eval: running batch statistics, no dropout. paper: as the paper at test time, "
                  "dropout on, with the seed of the masks as a second input (saved_model, stablehlo).")
flags.DEFINE_enum("dtype", "float32", export.DTYPES,
                  "float32: images in [-1, 1] in and out. uint8: pixels in [0, 255], converted inside the model.")
flags.DEFINE_enum("layout", "NHWC", export.LAYOUTS, "The images' axes, in and out.")
flags.DEFINE_integer("size", None, "Fix the height and width to this; by default the training crop for "
                     "onnx and any multiple of what the generator needs for the others.")
flags.mark_flags_as_required(["workdir", "format", "output"])


def main(argv):
  info = cli.run_command(
      argv, export.export_generator,
      {"fmt": "--format", "output": "--output", "size": "--size", "step": "--step", "mode": "--mode"},
      FLAGS.workdir, FLAGS.output, FLAGS.format, step=FLAGS.step, mode=FLAGS.mode, dtype=FLAGS.dtype,
      layout=FLAGS.layout, size=FLAGS.size)
  logging.info("Wrote the step %d generator to %s: %s %s images, height and width %s.", info["step"],
               FLAGS.output, info["layout"], info["dtype"],
               info["height"] or f"any multiple of {info['size_multiple']}")


if __name__ == "__main__":
  experiments.run(main)
