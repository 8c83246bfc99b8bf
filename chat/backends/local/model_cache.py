"""The folder where the app keeps the models it builds itself (the offline default models).

`$FALCON_CHAT_CACHE`, else `$XDG_CACHE_HOME/falcon-chat`, else `~/.cache/falcon-chat`: one
sub-folder per model and recipe version, built once and reused by every later start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where built models are kept (see the module docstring)."""
    if os.environ.get("FALCON_CHAT_CACHE"):
        return Path(os.environ["FALCON_CHAT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "falcon-chat"


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, made by `build(staging_folder)` unless it already holds a model.

    Built beside the target and renamed, so a crash or a concurrent start never leaves half a
    model where the next start would find it.
    """
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").exists():  # not just another start finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
