r"""Translates images with a trained generator.

  python -m experiments.translate --workdir DIR --input PATH --output OUT_DIR

PATH is one image or a folder of them (single images of the run's source
domain, not A|B pairs). Each is resized to the model's size, translated and the
result resized back to the input's size, saved as OUT_DIR/<name>.png.
"""

from absl import app, flags, logging

from experiments import cli
from p2p_jax import inference, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir (its checkpoints are used).")
flags.DEFINE_string("input", None, "An image, or a folder of images.")
flags.DEFINE_string("output", None, "Folder for the translated images (created if needed).")
flags.DEFINE_integer("step", None, "Checkpoint step to use; the latest by default.")
flags.DEFINE_enum("mode", "eval", train.GENERATE_MODES,
                  "eval: running batch statistics, no dropout. paper: as the paper at test time, "
                  "each image normalised with its own statistics and dropout on.")
flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed of the dropout masks in --mode=paper.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  written = cli.run_command(
      argv, inference.translate_paths,
      {"input_path": "--input", "output_dir": "--output", "batch_size": "--batch_size", "step": "--step"},
      FLAGS.workdir, FLAGS.input, FLAGS.output, step=FLAGS.step, mode=FLAGS.mode,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  logging.info("Wrote %d image(s) to %s.", len(written), FLAGS.output)


if __name__ == "__main__":
  app.run(main)
