r"""Evaluates a checkpoint on a split: mean L1, PSNR and SSIM, and a sample sheet.

  python -m experiments.evaluate --workdir DIR [--step N] [--split val] [--mode paper]

Writes DIR/eval/<split>_<mode>_step<N>.json, TensorBoard scalars and images in
DIR/eval, and the sheet (with an index.html) in DIR/eval/<split>_<mode>/.
"""

import json
import pathlib

from absl import app, flags, logging

from experiments import cli
from p2p_jax import inference, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; the latest by default.")
flags.DEFINE_string("split", None, "Split to evaluate; the config's eval_split by default.")
flags.DEFINE_enum("mode", "eval", train.GENERATE_MODES,
                  "eval: running batch statistics, no dropout. paper: as the paper at test time, "
                  "each image normalised with its own statistics and dropout on.")
flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.DEFINE_string("data_dir", None, "Overrides the config's data_dir (e.g. on another machine).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  results = cli.run_command(
      argv, inference.evaluate_checkpoint, {"batch_size": "--batch_size", "split": "--split", "step": "--step"},
      FLAGS.workdir, step=FLAGS.step, split=FLAGS.split, mode=FLAGS.mode, batch_size=FLAGS.batch_size,
      data_dir=FLAGS.data_dir)
  logging.info("Wrote %s", pathlib.Path(FLAGS.workdir) / inference.EVAL_DIR)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
