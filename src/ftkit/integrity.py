"""Checksums of what ftkit writes, verified before anything is loaded back.

Every directory ftkit publishes (a checkpoint, a run's final artefacts, a saved adapter, a merged
model, the embedded base in ``$FTKIT_HOME``) carries ``checksums.sha256``: the SHA-256 of each of
its files, written last, inside the scratch directory, just before the atomic rename. A published
directory therefore always lists exactly the files it was published with, and a file damaged on
disk afterwards (truncated by a full disk or a killed copy, a flipped bit) is named before a
loader meets it as a torch or safetensors traceback, or silently loads wrong numbers.

The manifest is ``sha256sum``'s own format (``<hex>  <relative path>``, sorted), so a copy can be
checked without ftkit: ``cd DIR && sha256sum -c checksums.sha256``. ``README.md`` is left out: it
is the model card, a document people edit before uploading (and ftkit rewrites it after the
commit); nothing loads it.

Files are hashed streaming (1 MiB reads), once each, several at a time: the optimizer state of a
full fine-tune is gigabytes, split over many files under DeepSpeed/FSDP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.io import atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checksums.sha256"
NOT_LISTED = frozenset({MANIFEST_NAME, "README.md"})  # README.md: the model card, see above
_CHUNK = 1 << 20
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class DamagedFileError(FtkitError):
    """A file no longer matches the checksum it was written with."""


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of ``path``, read 1 MiB at a time (never the whole file in memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL: files hash in parallel
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative, POSIX, sorted) but ``NOT_LISTED``."""
    names = (
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()
    )
    return sorted(name for name in names if name not in NOT_LISTED)


def _hash_all(directory: Path, names: list[str]) -> dict[str, str | None]:
    """name -> hex digest (None: the file is missing), hashing a few files at a time."""

    def digest(name: str) -> str | None:
        try:
            return sha256_file(directory / name)
        except FileNotFoundError:
            return None

    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(digest, names), strict=True))


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write ``directory/checksums.sha256`` listing every file now in ``directory``.

    Call it once the directory is complete and before it is published: in the scratch dir of an
    atomic write, by the one process that renames it into place.
    """
    directory = Path(directory)
    digests = _hash_all(directory, _listed_files(directory))
    lines = [f"{digests[name]}  {name}\n" for name in sorted(digests)]
    atomic_write_text(directory / MANIFEST_NAME, "".join(lines))
    return directory / MANIFEST_NAME


def read_manifest(directory: Path) -> dict[str, str] | None:
    """``name -> sha256`` from ``directory``'s manifest; None when it has none.

    An unreadable manifest is itself damage, named like any damaged file.
    """
    try:
        text = (Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{MANIFEST_NAME} is unreadable ({err})") from err
    listed = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.match(line)
        if match is None:
            raise DamagedFileError(
                f"{MANIFEST_NAME} is damaged (its line {number} is not `<sha256>  <file>`)"
            )
        listed[match.group(2)] = match.group(1)
    return listed


def damage(directory: str | os.PathLike) -> str | None:
    """What is damaged in ``directory`` according to its manifest, in words naming the file
    (relative to ``directory``); None if nothing.

    None too when there is no manifest (PEFT's own adapters, older ftkit): that is logged, since
    nothing could be verified. Files the manifest does not list are not judged.
    """
    directory = Path(directory)
    try:
        listed = read_manifest(directory)
    except DamagedFileError as err:
        return str(err)
    if listed is None:
        logger.info("%s has no %s: nothing to verify its files against", directory, MANIFEST_NAME)
        return None
    found = _hash_all(directory, sorted(listed))
    missing = [name for name, digest in found.items() if digest is None]
    changed = [name for name, digest in found.items() if digest not in (None, listed[name])]
    problems = [f"{name} is missing" for name in missing] + [
        f"{name} does not match its SHA-256 in {MANIFEST_NAME} (truncated or changed on disk)"
        for name in changed
    ]
    if not problems:
        return None
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more file{'s' * (more > 1)})" if more else "")


def verify(directory: str | os.PathLike, what: str, fix: str) -> None:
    """Raise ``DamagedFileError`` naming ``what`` (e.g. "adapter"), its damaged file and ``fix``."""
    problem = damage(directory)
    if problem is not None:
        raise DamagedFileError(f"{what} {directory} is damaged: {problem}; {fix}")
