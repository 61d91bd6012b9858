r"""Evaluates a checkpoint on a split: mean L1, PSNR and SSIM, and a sample sheet.

  python -m experiments.evaluate --workdir DIR [--step N] [--split val] [--mode paper]

Writes DIR/eval/<split>_<mode>_step<N>.json, TensorBoard scalars and images in
DIR/eval, and the sheet (with an index.html) in DIR/eval/<split>_<mode>/.
"""

import json
import pathlib
import sys
from typing import Any, Dict, Optional

from absl import app, flags, logging

from p2p_jax import checkpoint, summaries, train, trainer

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

EVAL_DIR = "eval"


def evaluate_checkpoint(workdir, *, step: Optional[int] = None, split: Optional[str] = None,
                        mode: str = "eval", batch_size: int = 8,
                        data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` and writes the results; returns them."""
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  config = checkpoint.load_config(workdir, step)
  if data_dir is not None:
    config.data_dir = data_dir
  state = checkpoint.load_state(workdir, step)
  step, split = int(state.step), split or config.eval_split
  means, sheet = trainer.evaluate(state, config, split=split, mode=mode, batch_size=batch_size)
  results = {"step": step, "split": split, "mode": mode, "dataset": config.dataset, **means}

  out = pathlib.Path(workdir).expanduser() / EVAL_DIR
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{split}_{mode}_step{step}.json").write_text(json.dumps(results, indent=2) + "\n")
  summaries.write_samples(out / f"{split}_{mode}", step, sheet)
  writer = summaries.create_writer(out)
  writer.write_scalars(step, {f"{split}_{mode}/{name}": means[name] for name in ("l1", "psnr", "ssim")})
  writer.write_images(step, {f"{split}_{mode}/samples": sheet[None]})
  writer.flush()
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  try:
    results = evaluate_checkpoint(FLAGS.workdir, step=FLAGS.step, split=FLAGS.split,
                                  mode=FLAGS.mode, batch_size=FLAGS.batch_size,
                                  data_dir=FLAGS.data_dir)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  logging.info("Wrote %s", pathlib.Path(FLAGS.workdir) / EVAL_DIR)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
