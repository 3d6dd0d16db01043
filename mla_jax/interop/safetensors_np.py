"""The safetensors file format read and written with numpy alone (no torch, no extra package).

A file is: 8 bytes little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, optional "__metadata__": {str: str}}, then the raw little-endian
tensor bytes, offsets relative to the end of the header. bfloat16 maps to ml_dtypes.bfloat16
(a jax dependency), so bf16 checkpoints load without conversion loss.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
  """(header dict without __metadata__, byte offset of the data block)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 << 20:
      raise ValueError(f"{path}: not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


def load(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one file, {name: array} (memory-mapped, read-only)."""
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if header else None
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of "
                       f"{tuple(_DTYPES)}")
    begin, end = info["data_offsets"]
    dt = np.dtype(_DTYPES[info["dtype"]])
    out[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(info["shape"])
  return out


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None):
  """Writes {name: array} as one safetensors file (written to a temporary name, then renamed)."""
  header, blobs, offset = {}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = dict(metadata)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data block starts 8-byte aligned, as the reference writer
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for raw in blobs:
      f.write(raw)
  os.replace(tmp, path)


def load_dir(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory: model.safetensors, or the shards an index names."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{directory}: no *.safetensors files (only safetensors checkpoints are "
                     "read; convert a pytorch_model.bin first)")
  out = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ValueError(f"{index}: names {name}, which is not in {directory}")
    out.update(load(path))
  return out
