"""Visual progress: sample sheets as PNG, an index.html over time, TensorBoard writers.

A sample sheet has one row per example: input | generated | target | absolute
error (black = exact, white = off by the whole [-1, 1] range, averaged over
the colour channels), the layout of the Keras pix2pix tutorials' plots plus an
error map that shows where the generator is still wrong. Images of one or two
channels show their first channel as grey, images of more than three their
first three as RGB.
"""

import html
import re

import jax
import numpy as np
from clu import metric_writers
from etils import epath
from PIL import Image

from p2p_jax import images

SAMPLES_DIR = "samples"
SHEET_COLUMNS = ("input", "generated", "target", "|error|")
_SHEET_NAME = re.compile(r"step_(\d+)\.png")


def to_uint8(pixels) -> np.ndarray:
  """Images in [-1, 1] as 8-bit pixels, rounded to the nearest level (as translate writes them)."""
  return images.quantize(pixels, 8)


def displayable(pixels: np.ndarray) -> np.ndarray:
  """NHWC images of any channel count as RGB: the first channel as grey below 3, the first 3 above."""
  pixels = np.asarray(pixels, np.float32)
  if pixels.shape[-1] < 3:
    return np.repeat(pixels[..., :1], 3, axis=-1)
  return pixels[..., :3]


def sample_sheet(inputs, generated, targets) -> np.ndarray:
  """A uint8 [N*H, 4*W, 3] sheet of NHWC images in [-1, 1], each of any channel count (``displayable``)."""
  generated, targets = np.asarray(generated, np.float32), np.asarray(targets, np.float32)
  error = np.abs(generated - targets).mean(-1, keepdims=True) - 1.0  # [0, 2] -> [-1, 1]
  columns = [displayable(inputs), displayable(generated), displayable(targets), np.repeat(error, 3, axis=-1)]
  rows = np.concatenate(columns, axis=2)  # N, H, 4W, 3
  return to_uint8(rows.reshape(-1, *rows.shape[2:]))


def sheet_path(directory, step: int) -> epath.Path:
  return epath.Path(directory) / f"step_{step:08d}.png"


def write_index(directory) -> epath.Path:
  """(Re)writes ``directory/index.html``: every sample sheet there, newest first."""
  directory = epath.Path(directory)
  sheets = sorted(((int(m.group(1)), p.name) for p in directory.iterdir()
                   if (m := _SHEET_NAME.fullmatch(p.name))), reverse=True)
  title = f"p2p_jax samples: {html.escape(str(directory.parent.name))}"
  body = "\n".join(
      f'<h2 id="step{step}">step {step}</h2>\n<img src="{name}" alt="samples at step {step}">'
      for step, name in sheets)
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} img{{image-rendering:pixelated;width:min(100%,1024px)}}</style>
</head><body>
<h1>{title}</h1>
<p>Each row: {' | '.join(SHEET_COLUMNS)}. Newest first. One- and two-channel images show their
first channel as grey; images of more than three channels show their first three as RGB.</p>
{body}
</body></html>
"""
  index = directory / "index.html"
  index.write_text(page)
  return index


def write_samples(directory, step: int, sheet: np.ndarray) -> epath.Path:
  """Saves ``sheet`` as ``directory/step_<step>.png`` and updates the index next to it.

  ``directory`` may be a local path or a URL such as ``gs://bucket/run/samples``.
  """
  directory = epath.Path(directory)
  path = sheet_path(directory, step)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
      Image.fromarray(sheet).save(file, format="PNG")
    write_index(directory)
  except OSError as error:  # PIL's error names no file.
    raise OSError(error.errno, f"Cannot write the sample sheet {path}: {error.strerror or error}") from None
  return path


RESULT_KINDS = ("real_A", "fake_B", "real_B")


def write_result_images(directory, names, real_a, fake_b, real_b, bits=(8, 8)) -> None:
  """Per-image results as the reference's test.py writes them: ``directory/images/<name>_<kind>.png``.

  ``names`` are the images' file stems; the arrays NHWC in [-1, 1], written at
  ``bits`` = (the input's, the target's) bit depth, as TIFF for channel counts
  other than 1 and 3 (``images.encode``).
  """
  images_dir = epath.Path(directory) / "images"
  images_dir.mkdir(parents=True, exist_ok=True)
  for name, *arrays in zip(names, real_a, fake_b, real_b):
    for kind, array, depth in zip(RESULT_KINDS, arrays, (bits[0], bits[1], bits[1])):
      path = images_dir / f"{name}_{kind}{images.extension(array.shape[-1])}"
      path.write_bytes(images.encode(array, depth))


def write_results_index(directory, names, channels=(3, 3)) -> epath.Path:
  """``directory/index.html``: one row per image, its ``real_A | fake_B | real_B`` (``channels``: A's, B's)."""
  directory = epath.Path(directory)
  suffixes = [images.extension(c) for c in (channels[0], channels[1], channels[1])]
  rows = "\n".join(
      f"<tr><td>{html.escape(name)}</td>" + "".join(
          f'<td><img src="images/{html.escape(name)}_{kind}{suffix}" alt="{kind}"></td>'
          for kind, suffix in zip(RESULT_KINDS, suffixes))
      + "</tr>" for name in names)
  title = f"p2p_jax results: {html.escape(directory.name)}"
  index = directory / "index.html"
  index.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} img{{image-rendering:pixelated;width:256px}}</style>
</head><body>
<h1>{title}</h1>
<table><tr><th>name</th>{''.join(f'<th>{kind}</th>' for kind in RESULT_KINDS)}</tr>
{rows}
</table></body></html>
""")
  return index


def create_writer(logdir) -> metric_writers.MetricWriter:
  """TensorBoard event files in ``logdir``, written by process 0 only.

  The terminal's lines come from ``progress``; clu's logging writer would add
  its own for every write (images included).
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(str(logdir))
