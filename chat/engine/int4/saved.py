"""Our own int4 folders: what `--save-quantized DIR` writes, and reading one back.

The format (int4.json: "falcon-chat-int4", version 2): each linear layer under its checkpoint name
as `NAME.packed` (uint8 [out, in / 2]), `NAME.scale` and `NAME.offset` ([out, in / group]), its
group size in the manifest; the head as `lm_head` (also where tied to the embedding); every other
tensor (embedding, norms, biases) as it was read; config.json without a quantization_config, and
the tokenizer's files. Shards of about 4 GB are written while the layers are laid out, so saving
never holds the model twice (Falcon-180B's int4 is 97 GB).

Read back, the folder is a checkpoint whose linear layers are quantized (a `CheckpointQuantization`
for int4/checkpoints.py): the layout builder (weights.py) takes each as it takes a GPTQ layer, and
gets its int4 weight unchanged. `--model DIR --quantize int4` then starts without the bf16 weights.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from chat.engine.int4 import weight as int4
from chat.engine.layout import Unsupported

FORMAT = "falcon-chat-int4"
VERSION = 2
SHARD_BYTES = 4 << 30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class Int4Writer:
    """Receives the int4 weights and dense tensors `lay_out` makes; `finish` completes the folder,
    `discard` drops it. A new folder, written whole or not at all (engine/new_folder.py)."""

    def __init__(self, folder, source_folder=None):
        from chat.engine.new_folder import NewFolder

        self._new = NewFolder(folder, source_folder)
        self.folder = self._new.partial
        self.groups: dict[str, int] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._files: list[str] = []

    def add_int4(self, module: str, weight: int4.Int4Weight) -> None:
        self.groups[module] = weight.group_size
        for part in ("packed", "scale", "offset"):
            self._add(f"{module}.{part}", getattr(weight, part))

    def add_dense(self, name: str, tensor: torch.Tensor) -> None:
        self._add(name, tensor)

    def finish(self, config, source_folder) -> None:
        """The last shard, the manifest, the config and the tokenizer's files."""
        self._write()
        manifest = {"format": FORMAT, "version": VERSION, "files": self._files, "group_sizes": self.groups}
        (self.folder / "int4.json").write_text(json.dumps(manifest, indent=1))
        config = copy.deepcopy(config)
        if hasattr(config, "quantization_config"):  # a GPTQ/AWQ source's: the saved weights are ours
            del config.quantization_config
        config.save_pretrained(self.folder)
        for name in TOKENIZER_FILES:
            if (Path(source_folder) / name).is_file():
                shutil.copyfile(Path(source_folder) / name, self.folder / name)
        self._new.commit()

    def discard(self) -> None:
        self._new.discard()

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor.detach().to("cpu").contiguous()
        self._bytes += tensor.numel() * tensor.element_size()
        if self._bytes > SHARD_BYTES:
            self._write()

    def _write(self) -> None:
        from safetensors.torch import save_file

        if not self._tensors:
            return
        name = f"int4-{len(self._files) + 1:05d}.safetensors"
        save_file(self._tensors, str(self.folder / name))
        self._files.append(name)
        self._tensors, self._bytes = {}, 0


def is_saved(folder) -> bool:
    path = Path(folder) / "int4.json"
    return path.exists() and json.loads(path.read_text()).get("format") == FORMAT


@dataclass(frozen=True)
class SavedInt4:
    """A saved folder's quantization (see the module docstring)."""

    groups: dict[str, int] = field(default_factory=dict)  # each layer's, by name
    method: ClassVar[str] = "saved int4"
    parts: ClassVar[tuple[str, ...]] = ("packed", "scale", "offset")

    def group_of(self, module: str) -> int:
        return self.groups[module]

    def drops(self, name: str, tensor: torch.Tensor) -> bool:
        return False

    def to_int4(self, parts: dict[str, torch.Tensor], group: int, name: str = "") -> int4.Int4Weight:
        weight = int4.Int4Weight(parts["packed"], parts["scale"], parts["offset"], self.groups[name])
        return int4.regroup(weight, group)


def read(folder) -> SavedInt4:
    manifest = json.loads((Path(folder) / "int4.json").read_text())
    if manifest.get("version") != VERSION:
        raise Unsupported(
            f"{folder} holds int4 weights in an earlier layout (format {manifest.get('version')}): "
            "save them again from the model's own checkpoint with --quantize int4 --save-quantized"
        )
    return SavedInt4(manifest["group_sizes"])
