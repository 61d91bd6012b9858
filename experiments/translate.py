r"""Translates images with a trained generator.

  python -m experiments.translate --workdir DIR --input PATH --output OUT_DIR

PATH is one image or a folder of them (single images of the run's source
domain, not A|B pairs: JPEG, PNG or TIFF, 8 or 16 bits). Each is translated at
the size the run's training transform gives it (--size=train: for
resize_and_crop the model's square, for scale_width the training width, for
crop and none the image's own) or at its own (--size=native), padded to what
the network takes; images over 1024 px translate in blended tiles. The result,
at the input's size and bit depth, is saved as OUT_DIR/<name>.png (.tif for
channel counts other than 1 and 3).
"""

from absl import flags, logging

import experiments
from experiments import cli
from p2p_jax import inference

FLAGS = flags.FLAGS
cli.define_generator_flags()
flags.DEFINE_string("input", None, "An image, or a folder of images.")
flags.DEFINE_string("output", None, "Folder for the translated images (created if needed).")
flags.DEFINE_integer("seed", 0, "Seed of the dropout masks in --mode=paper.")
flags.DEFINE_enum("size", "train", inference.SIZES,
                  "train: the deterministic part of the run's training transform; native: each image's own size.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  written = cli.run_command(
      argv, inference.translate_paths,
      {"input_path": "--input", "output_dir": "--output", "batch_size": "--batch_size", "step": "--step",
       "size": "--size"},
      FLAGS.workdir, FLAGS.input, FLAGS.output, step=FLAGS.step, mode=FLAGS.mode,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, size=FLAGS.size)
  logging.info("Wrote %d image(s) to %s.", len(written), FLAGS.output)


if __name__ == "__main__":
  experiments.run(main)
