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
