"""Writes a split for branchpoint as a safetensors file: `inputs` (f32,
[N, C, H, W], standardised as the model takes them) and `labels` (int64,
[N]). The format is safetensors' own (8-byte little-endian header length,
a JSON header, then the raw little-endian data), written here directly so
that the venv needs no package besides torch:

    import tensorfile
    tensorfile.write("validation.safetensors", inputs, labels)
"""

from __future__ import annotations

import json
import pathlib
import struct

import torch


def _raw(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a contiguous CPU tensor."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.float32:
        return struct.pack(f"<{t.numel()}f", *t.flatten().tolist())
    if t.dtype == torch.int64:
        return struct.pack(f"<{t.numel()}q", *t.flatten().tolist())
    raise TypeError(f"only f32 and int64 are written, got {t.dtype}")


def write(path, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    if inputs.dim() != 4 or inputs.dtype != torch.float32:
        raise ValueError(f"inputs: expected f32 [N, C, H, W], got {inputs.dtype} {list(inputs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.dtype.is_floating_point:
        raise ValueError(f"labels: expected integers [{inputs.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    blobs = [("inputs", "F32", list(inputs.shape), _raw(inputs)), ("labels", "I64", list(labels.shape), _raw(labels.long()))]
    header, offset = {}, 0
    for name, dtype, shape, data in blobs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with pathlib.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for *_, data in blobs:
            f.write(data)
