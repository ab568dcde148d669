"""Fashion-MNIST as branchpoint reads it, for training in Python.

Reads Debian's dataset-fashion-mnist files (idx, gzipped or not), normalises
with the built-in models' mean and std, and splits the 60,000 training
images into train and validation exactly as models/src/data.rs does (a
SplitMix64 Fisher-Yates permutation of the indices, seed 2021, the first
5,000 for validation), so that a model trained here never saw the inputs
branchpoint calibrates on.
"""

from __future__ import annotations

import gzip
import pathlib
import struct

import torch

DEFAULT_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.286, 0.353
SEED, VALIDATION = 2021, 5000
MASK = (1 << 64) - 1


class SplitMix64:
    """core/src/rng.rs's generator, bit for bit."""

    def __init__(self, seed: int):
        self.state = seed & MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return ((self.next_u64() >> 32) * n) >> 32

    def permutation(self, n: int) -> list[int]:
        v = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]
        return v


def train_validation_indices(n: int, validation: int = VALIDATION, seed: int = SEED) -> tuple[list[int], list[int]]:
    """models/src/data.rs's train_validation_indices: (train, validation),
    each sorted."""
    if validation >= n:
        raise ValueError(f"a validation split of {validation} leaves no training inputs out of {n}")
    perm = SplitMix64(seed).permutation(n)
    return sorted(perm[validation:]), sorted(perm[:validation])


def _read(path: pathlib.Path) -> bytes:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            data = p.read_bytes()
            return gzip.decompress(data) if p.suffix == ".gz" else data
    raise FileNotFoundError(f"{path} (or {path.name}.gz) not found; install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass its folder")


def images(path: pathlib.Path) -> torch.Tensor:
    """[N, 1, 28, 28] f32, normalised."""
    data = _read(path)
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051 or len(data) != 16 + n * rows * cols:
        raise ValueError(f"{path}: not an idx image file (magic {magic}, {len(data)} bytes for {n} images of {rows}x{cols})")
    x = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, 1, rows, cols).float() / 255.0
    return (x - MEAN) / STD


def labels(path: pathlib.Path) -> torch.Tensor:
    data = _read(path)
    magic, n = struct.unpack(">II", data[:8])
    if magic != 2049 or len(data) != 8 + n:
        raise ValueError(f"{path}: not an idx label file (magic {magic}, {len(data)} bytes for {n} labels)")
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).long()


def load(directory: pathlib.Path = DEFAULT_DIR) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "validation", "test"}: (inputs, labels)."""
    x, y = images(directory / "train-images-idx3-ubyte"), labels(directory / "train-labels-idx1-ubyte")
    train, val = train_validation_indices(len(y))
    tx, ty = images(directory / "t10k-images-idx3-ubyte"), labels(directory / "t10k-labels-idx1-ubyte")
    return {"train": (x[train], y[train]), "validation": (x[val], y[val]), "test": (tx, ty)}
