"""What the entry points share: a library error becomes one line, in the terms the user typed.

The library names config keys (``config.batch_size=3``) and its functions'
arguments (``input_path=...``); on the command line those are flags
(``--config.batch_size=3``, ``--input=...``).
"""

import re
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from absl import app

from p2p_jax import checkpoint, input_pipeline, trainer

# What the library raises for bad input: each carries a message for the user.
USER_ERRORS = (ValueError, OSError, input_pipeline.DatasetUnavailableError, trainer.NonFiniteError)
_NOT_AFTER = r"(?<![\w./-])"  # A name starts a word: "config." in "experiments/configs/x.py" is no key.


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
