"""Atomic file-system writes: a crash never leaves a half-written artefact that looks valid.

Temp files and dirs are created private (``mkstemp`` 0600, ``mkdtemp`` 0700); before they are
renamed into place they get the modes a plain ``open``/``mkdir`` would give under the umask
(0644 / 0755 under umask 022), so other users of a shared machine can read the results.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a scratch directory beside ``target``; on success it replaces ``target`` in one rename.

    On any exception the scratch directory is deleted and ``target`` is left exactly as it was.
    ``replace=False`` (a cache entry, whose content its name fixes): a ``target`` that exists by
    then, written by a concurrent writer, is kept and the scratch directory dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(scratch, 0o777 & ~current_umask())
        yield scratch
        umask_modes(scratch)
        _fsync_tree(scratch)
        if not replace:
            _rename_unless_present(scratch, target)
        elif target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(scratch, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _rename_unless_present(scratch: Path, target: Path) -> None:
    try:
        os.rename(scratch, target)  # fails on an existing non-empty dir: never two writers' files
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            raise
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes the umask gives new files and dirs.

    Some writers create private files whatever the umask (safetensors' ``save_file``: 0600).
    """
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
