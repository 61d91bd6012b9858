"""The local caches: where they live, the compilation cache per CPU, image scans that skip unchanged files."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from p2p_jax import cache, images


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv(cache.ENV, str(root))
  return root


@pytest.fixture
def no_jax_cache_dir():
  """JAX's own cache folder unset for the test (the suite sets one), restored after."""
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", saved)


def _folder_of_images(folder: pathlib.Path, count: int = 3):
  folder.mkdir(parents=True)
  for i in range(count):
    Image.fromarray(np.full((8, 16 + i, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
  return images.image_files(folder)


def _counting_inspect(monkeypatch):
  decoded = []
  inspect = images.inspect
  monkeypatch.setattr(images, "inspect", lambda path: decoded.append(path.name) or inspect(path))
  return decoded


@pytest.mark.parametrize("value, expected", [("off", None), ("", None), ("0", None), ("~/here", "~/here")])
def test_the_root_is_the_variable_or_none_when_it_says_off(monkeypatch, value, expected):
  monkeypatch.setenv(cache.ENV, value)
  assert cache.root() == (pathlib.Path(expected).expanduser() if expected else None)


def test_without_the_variable_the_root_is_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cache.root() == tmp_path / "p2p_jax" == cache.default_root()


def test_machines_with_other_instruction_sets_get_other_folders(monkeypatch):
  monkeypatch.setattr(cache, "_cpu_description", lambda: "AMD EPYC 7B13 64-Core Processor|avx avx2 fma")
  zen3 = cache.machine_key()
  monkeypatch.setattr(cache, "_cpu_description", lambda: "AMD EPYC 7B13 64-Core Processor|avx avx2 avx512f fma")
  assert zen3 != cache.machine_key()
  assert zen3.startswith("AMD-EPYC-7B13-64-Core-Processor-") and "/" not in zen3 and " " not in zen3


def test_compilation_cache_goes_to_the_machine_folder(cache_root, no_jax_cache_dir):
  folder = cache.enable_compilation_cache()
  assert folder == cache_root / "xla" / cache.machine_key() and folder.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(folder)


def test_compilation_cache_leaves_a_folder_the_user_set_alone(cache_root, tmp_path):
  jax_folder = jax.config.jax_compilation_cache_dir  # The suite's (conftest).
  assert jax_folder and cache.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == jax_folder and not cache_root.exists()


def test_an_unwritable_cache_folder_warns_and_compiles_without(tmp_path, monkeypatch, no_jax_cache_dir, caplog):
  (tmp_path / "file").write_text("")
  monkeypatch.setenv(cache.ENV, str(tmp_path / "file" / "cache"))
  assert cache.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir is None
  assert f"{cache.ENV}={tmp_path / 'file' / 'cache'}: cannot keep compiled programs there" in caplog.text


def test_importing_p2p_jax_keeps_compiled_programs_for_the_next_process(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update({cache.ENV: str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  program = ("import p2p_jax, jax, jax.numpy as jnp; print(jax.config.jax_compilation_cache_dir); "
             "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()")
  output = subprocess.run([sys.executable, "-c", program], env=env, check=True, capture_output=True, text=True)
  folder = tmp_path / "xla" / cache.machine_key()
  assert output.stdout.strip() == str(folder)
  assert any(folder.iterdir()), "nothing compiled was kept"


def test_a_second_scan_decodes_nothing_and_gives_the_same_infos(cache_root, tmp_path, monkeypatch):
  paths = _folder_of_images(tmp_path / "split")
  decoded = _counting_inspect(monkeypatch)
  first = images.decode_all(paths)
  assert sorted(decoded) == ["0.png", "1.png", "2.png"]
  decoded.clear()
  assert images.decode_all(paths) == first and not decoded
  assert all(isinstance(info, images.ImageInfo) for info in first)


def test_a_file_changed_since_its_scan_is_decoded_again(cache_root, tmp_path, monkeypatch):
  paths = _folder_of_images(tmp_path / "split")
  images.decode_all(paths)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(paths[1])  # now grey and 4x4
  decoded = _counting_inspect(monkeypatch)
  infos = images.decode_all(paths)
  assert decoded == ["1.png"]
  assert infos[1] == images.ImageInfo(4, 4, 1, 8, "PNG")


def test_a_file_damaged_since_its_scan_is_reported_not_remembered(cache_root, tmp_path):
  paths = _folder_of_images(tmp_path / "split")
  images.decode_all(paths)
  paths[2].write_bytes(paths[2].read_bytes()[:40])
  assert isinstance(images.decode_all(paths)[2], Exception)
  assert isinstance(images.decode_all(paths)[2], Exception)


def test_with_caching_off_every_scan_decodes_and_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.setenv(cache.ENV, "off")
  paths = _folder_of_images(tmp_path / "split")
  decoded = _counting_inspect(monkeypatch)
  images.decode_all(paths)
  images.decode_all(paths)
  assert len(decoded) == 6


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"version": 1}', "RECORD_WITH_SHORT_INFO"])
def test_a_damaged_scan_record_is_ignored_and_written_again(cache_root, tmp_path, monkeypatch, damage):
  paths = _folder_of_images(tmp_path / "split")
  images.decode_all(paths)
  (record,) = (cache_root / "scans").iterdir()
  if damage == "RECORD_WITH_SHORT_INFO":
    data = json.loads(record.read_text())
    data["files"]["0.png"][1] = data["files"]["0.png"][1][:2]
    damage = json.dumps(data)
  record.write_text(damage)
  decoded = _counting_inspect(monkeypatch)
  images.decode_all(paths)
  assert len(decoded) == 3
  assert set(json.loads(record.read_text())["files"]) == {"0.png", "1.png", "2.png"}


def test_a_moved_folder_is_scanned_anew(cache_root, tmp_path, monkeypatch):
  """Records are per folder path: another folder with the same file names is not taken for it."""
  images.decode_all(_folder_of_images(tmp_path / "one"))
  decoded = _counting_inspect(monkeypatch)
  images.decode_all(_folder_of_images(tmp_path / "two"))
  assert len(decoded) == 3


# A process that runs one KeptExecutable and prints how often its function was traced, and the result.
_KEPT_PROGRAM = """
import jax, jax.numpy as jnp, numpy as np
from absl import logging
from p2p_jax import cache
logging.set_verbosity(logging.INFO)
traces = []
def program(key, x):
  traces.append(1)
  return jax.random.normal(key, (48, 48)) @ jnp.sin(x) + 1.0
kept = cache.KeptExecutable(jax.jit(program), {"program": "test"}, jax.devices()[:1])
result = np.asarray(kept(jax.random.key(3), jnp.ones((48, 48))))
print(len(traces), result.sum().tolist())
"""


def _run_kept_program(ours, jax_cache):
  """(times traced, result, stderr) of _KEPT_PROGRAM with these cache folders (``ours`` "off" for none)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update({cache.ENV: str(ours), "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  done = subprocess.run([sys.executable, "-c", _KEPT_PROGRAM], env=env, check=True, capture_output=True, text=True)
  traces, result = done.stdout.split()
  return int(traces), float(result), done.stderr


def _kept_files(ours):
  return sorted((ours / "executables").rglob("*.bin"))


def test_a_kept_executable_runs_in_the_next_process_without_tracing_and_gives_the_same(tmp_path):
  traces, result, _ = _run_kept_program(tmp_path / "ours", tmp_path / "jax")
  assert traces == 1 and len(_kept_files(tmp_path / "ours")) == 1
  traces_again, result_again, log = _run_kept_program(tmp_path / "ours", tmp_path / "jax")
  assert "Loaded the kept executable of test" in log
  assert traces_again == 0 and result_again == result


def test_a_program_jax_loaded_from_its_own_cache_is_not_kept(tmp_path):
  # XLA:CPU serialises such a program without its functions: kept, it would fail in the next process.
  _, result, _ = _run_kept_program("off", tmp_path / "jax")
  assert _run_kept_program(tmp_path / "ours", tmp_path / "jax")[1] == result
  assert not _kept_files(tmp_path / "ours")
  assert _run_kept_program(tmp_path / "ours", tmp_path / "jax")[1] == result


def test_the_key_changes_with_the_description_the_arguments_and_the_sources(cache_root, monkeypatch):
  devices = jax.devices()[:1]
  x, key = np.ones((4, 4), np.float32), {"program": "p", "config": {"lr": 1}}
  path = cache.executable_path(key, (x,), devices)
  assert path.parent == cache_root / "executables" / cache.machine_key()
  assert cache.executable_path(dict(key), (x.copy(),), devices) == path
  assert cache.executable_path({"program": "p", "config": {"lr": 2}}, (x,), devices) != path
  assert cache.executable_path(key, (np.ones((4, 5), np.float32),), devices) != path
  assert cache.executable_path(key, (x.astype(np.float16),), devices) != path
  assert cache.executable_path(key, ((x,),), devices) != path
  assert cache.executable_path(key, (x,), jax.devices()[1:2]) != path
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_thunk_runtime=true")
  assert cache.executable_path(key, (x,), devices) != path
  monkeypatch.undo()
  monkeypatch.setattr(cache, "_source_stamps", lambda: "edited")
  assert cache.executable_path(key, (x,), devices) != path


def test_the_source_stamps_change_when_a_traced_file_is_touched(tmp_path, monkeypatch):
  package = tmp_path / "fake_package"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "module.py").write_text("x = 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(cache, "_TRACED_PACKAGES", ("fake_package",))
  cache._source_stamps.cache_clear()
  try:
    before = cache._source_stamps()
    cache._source_stamps.cache_clear()
    (package / "module.py").write_text("x = 2\n")  # The same size: the modification time tells.
    os.utime(package / "module.py", ns=(1, 1))
    assert cache._source_stamps() != before
  finally:
    cache._source_stamps.cache_clear()


def test_with_caching_off_a_kept_executable_is_the_jitted_function(monkeypatch):
  monkeypatch.setenv(cache.ENV, "off")
  assert cache.executable_path({"program": "p"}, (np.ones(2),), jax.devices()[:1]) is None
  kept = cache.KeptExecutable(jax.jit(lambda x: x + 1), {"program": "p"}, jax.devices()[:1])
  np.testing.assert_array_equal(kept(np.ones(2)), np.full(2, 2.0))


def test_a_damaged_kept_executable_is_named_and_the_program_compiled_instead(cache_root, caplog):
  devices, x = jax.devices()[:1], np.full((3,), 2.0, np.float32)
  path = cache.executable_path({"program": "damaged"}, (x,), devices)
  path.parent.mkdir(parents=True)
  path.write_bytes(b"not an executable")
  kept = cache.KeptExecutable(jax.jit(lambda v: v * 3), {"program": "damaged"}, devices)
  with caplog.at_level("WARNING"):
    np.testing.assert_array_equal(kept(x), np.full((3,), 6.0))
  assert f"Could not load the kept executable of damaged from {path}" in caplog.text


def test_only_the_most_recently_used_executables_are_kept(tmp_path):
  for i in range(5):
    (tmp_path / f"{i}.bin").write_bytes(b"")
    os.utime(tmp_path / f"{i}.bin", ns=(i * 10**9, i * 10**9))
  cache._prune(tmp_path, 3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2.bin", "3.bin", "4.bin"]
