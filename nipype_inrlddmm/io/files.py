"""The file-system rules every reader and writer keeps.

A problem with a user's file is an :class:`InputError` that names it.  A
writer never leaves half a result: it writes a temporary sibling and
renames it into place (:func:`atomic_path`), and a run's outputs appear
together or not at all (:func:`staged_folder`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


class InputError(ValueError):
    """A user-supplied file that cannot be used; the message names it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of ``path`` (same extension) to write to.

    On success it is renamed onto ``path``; on any error it is removed, so
    ``path`` is either absent, the old file, or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(path):
    """Yield a fresh hidden sibling of folder ``path`` to write a run's outputs into.

    On success its files move into ``path`` (created when absent); on any
    error it is removed: a run that fails leaves ``path`` as it found it,
    never a field without its evaluation.
    """
    path = Path(path)
    stage = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    if path.exists() and not path.is_dir():
        raise InputError(path, "the output folder is a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as error:  # read-only, no permission, a file where a folder should be, a full disk
        raise InputError(path, f"cannot write the outputs here ({error.strerror or error})") from error
    try:
        yield stage
        path.mkdir(exist_ok=True)
        for item in stage.iterdir():
            os.replace(item, path / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
