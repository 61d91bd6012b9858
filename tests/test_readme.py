"""The README's code runs as written, and CI runs the README's test command."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_train_step_snippet_runs_as_written(tmp_path):
  snippet = re.search(r"<!-- readme-snippet -->\n```python\n(.*?)```", README, re.S).group(1)
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")  # The synthetic data goes there.
  env.pop("XLA_FLAGS", None)  # One CPU device, as on a user's machine.
  result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = result.stdout.strip().splitlines()[-1]
  for name in ("d_real", "d_fake", "d_loss", "g_gan", "g_l1", "g_loss"):
    assert f"'{name}': " in printed


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", README)
  assert len(commands) == 2, "two set-up commands: the main job and the tests"
  assert commands[1] in (ROOT / ".ci" / "run").read_text()
