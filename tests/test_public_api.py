"""What ``import p2p_jax`` offers: every public name resolves and says what it is."""

import subprocess
import sys

import pytest

import p2p_jax


@pytest.mark.parametrize("name", p2p_jax.__all__)
def test_every_public_name_has_a_docstring(name):
  value = getattr(p2p_jax, name)
  assert (value.__doc__ or "").strip(), f"p2p_jax.{name} has no docstring"


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="module 'p2p_jax' has no attribute 'Pix2pix'"):
    p2p_jax.Pix2pix  # pylint: disable=pointless-statement


def test_importing_p2p_jax_starts_neither_tensorflow_nor_a_backend():
  code = ("import sys, p2p_jax; from jax._src import xla_bridge; "
          "print('tensorflow' in sys.modules, xla_bridge.backends_are_initialized())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.split() == ["False", "False"]
