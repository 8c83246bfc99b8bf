"""Writing a new model folder (`--save-quantized`): all of it or nothing, and nothing outside it.

`--save-quantized` used to create the folder if needed and write into it: into an existing
folder, through a link planted there to a file outside it, and, pointed at the model's own folder,
over the checkpoint it was reading (issue #24). Now the target must not exist and must not be the
source; the files are written into a fresh private folder beside it (`mkdtemp`: no one else's
files or links inside), which is renamed to the target in one step once everything is written.
A failure or an interruption leaves no target, and the partial folder is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from chat.conversation.errors import ConfigError

FLAG = "--save-quantized"


def check_new_folder(target, source=None) -> Path:
    """`target` as a path, or ConfigError: it exists (folder, file or link), it is the source
    folder, or its parent folder does not exist."""
    target = Path(target).expanduser()
    if source is not None and target.resolve() == Path(source).resolve():
        raise ConfigError(f"{FLAG} {target} is the model's own folder: give a new folder")
    if os.path.lexists(target):
        raise ConfigError(
            f"{FLAG} {target} exists: give a new folder (nothing is written into an existing one)"
        )
    if not target.parent.is_dir():
        raise ConfigError(f"{FLAG} {target}: its parent folder does not exist")
    return target


class NewFolder:
    """A private folder to write into (`partial`) that becomes `target` on `commit`, or is removed
    by `discard`; `target` checked by `check_new_folder` first, and again at the end."""

    def __init__(self, target, source=None):
        self.target = check_new_folder(target, source)
        self.partial = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))

    def commit(self) -> None:
        try:
            os.chmod(self.partial, 0o755)  # mkdtemp's 0700 while writing; a model folder others may read
            if os.path.lexists(self.target):  # made by someone else meanwhile: theirs stays as it is
                raise ConfigError(f"{FLAG} {self.target} appeared while writing: nothing was saved")
            os.rename(self.partial, self.target)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
