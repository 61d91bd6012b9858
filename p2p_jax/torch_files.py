"""Reading the tensors of a PyTorch file (TorchScript or ``torch.save``) without PyTorch.

Such a file is a zip archive: ``<name>/data.pkl`` pickles the module tree,
and each tensor's storage is the raw little-endian file ``<name>/data/<key>``.
The unpickler here builds plain objects for the module classes and NumPy
arrays for the tensors, and runs nothing from the file: a weights file is
read as data. Used for the FID Inception weights that ship as TorchScript.
"""

import pickle
import zipfile
from typing import Any, Dict

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Module:
  """A pickled module object: its attributes, from the pickle's state."""

  def __init__(self, *args):
    del args
    self.attributes: Dict[str, Any] = {}

  def __setstate__(self, state):
    self.attributes = dict(state)


class _Storage:

  def __init__(self, key: str, dtype):
    self.key, self.dtype = key, dtype


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> "_TensorRef":
  del unused
  return _TensorRef(storage, offset, tuple(size), tuple(stride))


class _TensorRef:
  """A tensor not yet read: where its elements are in which storage."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Unpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if (module, name) == ("collections", "OrderedDict"):
      return dict
    if module == "torch.jit._pickle" and name.startswith("build_"):  # build_intlist etc.
      return lambda values: values
    if module.startswith("__torch__"):
      return type(name, (_Module,), {})
    raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

  def persistent_load(self, pid):
    kind, dtype, key, unused_location, unused_numel = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    return _Storage(str(key), dtype)


def read_tensors(path) -> Dict[str, np.ndarray]:
  """Every tensor attribute of the pickled module tree, by dotted path (``net.layers.conv.weight``)."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: not a PyTorch file (no single */data.pkl in the archive).")
    prefix = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as file:
      root = _Unpickler(file).load()
    tensors: Dict[str, np.ndarray] = {}

    def read(ref: _TensorRef) -> np.ndarray:
      data = np.frombuffer(archive.read(f"{prefix}data/{ref.storage.key}"), ref.storage.dtype)
      itemsize = data.dtype.itemsize
      return np.lib.stride_tricks.as_strided(
          data[ref.offset:], ref.size, [s * itemsize for s in ref.stride]).copy()

    def walk(node, path):
      if isinstance(node, _TensorRef):
        tensors[path] = read(node)
      elif isinstance(node, _Module):
        walk(node.attributes, path)
      elif isinstance(node, dict):
        for key, value in node.items():
          walk(value, f"{path}.{key}" if path else str(key))

    walk(root, "")
  return tensors
