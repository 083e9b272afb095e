"""Writing files atomically: a temporary file in the same folder, then a rename, so that a reader (or a
resumed run) never sees a partial file."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import torch

__all__ = ["atomic_write", "atomic_torch_save"]


def _keep_as(path: str, keep: str) -> None:
    """Make ``keep`` a copy of ``path`` (a hard link where the file system has them) without touching ``path``."""
    directory = os.path.dirname(os.path.abspath(keep))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(keep))
    os.close(fd)
    os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, keep)


def atomic_write(path: str, write: Callable[[str], Any], keep_previous: Optional[str] = None) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file, and ``path`` exists
    at every instant once written (a run killed at any moment leaves a whole file). ``keep_previous``: a path
    that receives the file being replaced, once the new one is written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        if keep_previous is not None and os.path.isfile(path):
            _keep_as(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str, keep_previous: Optional[str] = None) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename: a killed write leaves the old file
    (``keep_previous``: see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), keep_previous)
