"""A model folder's safetensors weights: the one reader every path of the engine uses.

Which files: the shards `model.safetensors.index.json` names (a folder may also hold a
consolidated copy beside them), else every `*.safetensors` in the folder (one file, or shards
without an index). Which names: as stored, except that `model.transformer.` (some Falcon
exports) is read as `transformer.`, the name transformers' Falcon gives it. A tensor is read
lazily (`get_slice`): only the rows or columns asked for leave the disk, so a tensor-parallel
rank never holds another rank's share, and the int4 loader holds about one layer at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

Ranges = list[range]


class Checkpoint:
    """The tensors of the safetensors files in `folder` (see the module docstring)."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files = _files(self.folder)
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, name as stored)
        self._in_file: dict[Path, list[str]] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as shard:
                stored_names = list(shard.keys())
            self._in_file[path] = [canonical_name(stored) for stored in stored_names]
            for name, stored in zip(self._in_file[path], stored_names, strict=True):
                self._where[name] = (path, stored)
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def names_in(self, path: Path) -> list[str]:
        """The tensors stored in one of `files`, in their order there."""
        return self._in_file[path]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(
        self,
        name: str,
        rows: Ranges | None = None,
        columns: Ranges | None = None,
        *,
        device="cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The tensor, or only its `rows` (ranges of the first dimension, joined in order) or its
        `columns` (of the second); floating-point tensors cast to `dtype` if given."""
        tensor = self._slice(name)
        if rows is not None:
            parts = [tensor[r.start : r.stop] for r in rows]
        elif columns is not None:
            parts = [tensor[:, c.start : c.stop] for c in columns]
        else:
            parts = [tensor[:]]
        whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 if columns is not None else 0)
        if dtype is not None and whole.is_floating_point():
            return whole.to(device=device, dtype=dtype)
        return whole.to(device)

    def _slice(self, name: str):
        from safetensors import safe_open

        path, stored = self._where[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path].get_slice(stored)


def canonical_name(stored: str) -> str:
    return stored.removeprefix("model.") if stored.startswith("model.transformer.") else stored


def _files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():  # the shards it names (a folder may also hold a consolidated copy)
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    split = sorted(folder.glob("*.safetensors-split-*")) or sorted(folder.glob("*.safetensors.split-*"))
    if split:
        raise FileNotFoundError(
            f"{folder} holds a safetensors file split in parts ({split[0].name}, ...): join them "
            "first, e.g. cat model.safetensors-split-* > model.safetensors"
        )
    raise FileNotFoundError(f"{folder} has no .safetensors files (only those are read)")
