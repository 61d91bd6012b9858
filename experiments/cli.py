"""What the entry points share: a library error becomes one line, in the terms the user typed.

The library names config keys (``config.batch_size=3``) and its functions'
arguments (``input_path=...``); on the command line those are flags
(``--config.batch_size=3``, ``--input=...``).
"""

import re
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from absl import app, flags

from p2p_jax import checkpoint, input_pipeline, train, trainer

# What the library raises for bad input: each carries a message for the user.
USER_ERRORS = (ValueError, OSError, input_pipeline.DatasetUnavailableError, trainer.NonFiniteError)
_NOT_AFTER = r"(?<![\w./-])"  # A name starts a word: "config." in "experiments/configs/x.py" is no key.
flags.disclaim_key_flags()  # The flags defined here belong to the entry point that calls for them.


def define_generator_flags() -> None:
  """The flags of the entry points that run a trained generator (evaluate, translate): which run and
  checkpoint, and how the generator runs. Each entry point's ``--help`` lists them as its own."""
  flags.DEFINE_string("workdir", None, "The training run's workdir (its checkpoints are used).")
  flags.DEFINE_integer("step", None, "Checkpoint step to use; the latest by default.")
  flags.DEFINE_enum("mode", "eval", train.GENERATE_MODES,
                    "eval: running batch statistics, no dropout. paper: as the paper at test time, "
                    "each image normalised with its own statistics and dropout on.")
  flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
  flags.mark_flags_as_required(["workdir"])


def in_flag_terms(message: str, flags: Mapping[str, str] = {}) -> str:  # pylint: disable=dangerous-default-value
  """``message`` on one line, with ``config.<key>`` as ``--config.<key>`` and each argument as its flag."""
  message = re.sub(rf"{_NOT_AFTER}config\.(?=\w)", "--config.", " ".join(message.split("\n")))
  for argument, flag in flags.items():
    message = re.sub(rf"{_NOT_AFTER}{argument}=", f"{flag}=", message)
  return message


def exit_with(error: BaseException, flags: Mapping[str, str] = {}) -> NoReturn:  # pylint: disable=dangerous-default-value
  """Ends the process with status 1 and ``error: <message>`` on stderr."""
  sys.exit(f"error: {in_flag_terms(str(error), flags)}")


def run_command(argv: Sequence[str], function: Callable[..., Any], flags: Mapping[str, str],
                *args, **kwargs) -> Any:
  """``function(*args, **kwargs)`` for an entry point's ``main``: a user error exits in ``flags``' terms.

  ImportError too: a missing optional package is named with the extra to install.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  try:
    return function(*args, **kwargs)
  except (*USER_ERRORS, ImportError) as error:  # OSError: e.g. an --output that cannot be written.
    exit_with(error, flags)
