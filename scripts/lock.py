"""ftkit's dependency locks: the exact environment CI tested, and setup.cfg's lower bounds.

A lock is written by freezing a virtual environment in which the test suite has just passed
(``make lock``, ``make lock-oldest``), never by resolving metadata alone: what the lock names is
then by construction what ran green. pip does the resolving (the same resolver ``make install``
uses, which also sees this machine's CPU build of torch); this script only records and checks.

    python scripts/lock.py freeze requirements/lock.txt   # write the running environment
    python scripts/lock.py check requirements/lock.txt    # is the running environment the lock?
    python scripts/lock.py lower-bounds                   # setup.cfg's >= bounds as == pins

Run it with the interpreter of the environment it is about (``.venv/bin/python scripts/...``).
Versions are compared without their local label: torch's CPU build ``2.13.0+cpu`` and the CUDA
build ``2.13.0`` are the same release, so one lock serves a CPU machine and a GPU one (where
``make install`` lets pip choose the build).
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SETUP_CFG = REPO / "setup.cfg"
# The project itself is installed editable from the checkout; it is never locked.
NOT_LOCKED = {"ftkit"}
# Extras whose lower bounds the oldest set tests with the core (the CPU suite runs them);
# dev tools, trackers, liger (CUDA) and the peer benchmark's TRL are left to the newest set.
LOWER_BOUND_EXTRAS = ("quant", "deepspeed")


def installed() -> dict[str, str]:
    """Every distribution of the running interpreter: canonical name -> version."""
    found = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in NOT_LOCKED:
            found[name] = dist.version
    return found


def public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``."""
    return Version(version).public


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            sys.exit(f"{path}:{number}: not a `name==version` pin: {line!r}")
        pins[canonicalize_name(name)] = version.strip()
    return pins


def freeze(path: Path, title: str) -> None:
    """Write the running environment as a lock, atomically."""
    env = installed()
    stamp = datetime.date.today().isoformat()
    lines = [
        f"# {title}",
        f"# Frozen by `python scripts/lock.py freeze` on {stamp} from a virtual environment in",
        f"# which the suite had just passed: Python {platform.python_version()},"
        f" {platform.system()} {platform.machine()}. Do not edit by hand; see docs/dependencies.md.",
    ]
    for name in sorted(env):
        version = env[name]
        note = f"  # installed here as {version}" if public(version) != version else ""
        lines.append(f"{name}=={public(version)}{note}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8"
    ) as tmp:
        tmp.write("\n".join(lines) + "\n")
    os.chmod(tmp.name, 0o666 & ~_umask())
    os.replace(tmp.name, path)
    print(f"{path}: {len(env)} packages")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check(path: Path) -> int:
    """0 when every locked package is installed at its locked version; else list the drift.

    Packages installed beyond the lock are listed, not refused: a GPU install adds the CUDA
    libraries torch's CUDA build depends on, which a CPU lock cannot name.
    """
    lock, env = read_lock(path), installed()
    missing = sorted(name for name in lock if name not in env)
    drift = sorted(
        f"{name} {env[name]} (locked {lock[name]})"
        for name in lock
        if name in env and public(env[name]) != lock[name]
    )
    extra = sorted(name for name in env if name not in lock)
    if missing or drift:
        for label, names in (("not installed", missing), ("other version", drift)):
            if names:
                print(f"{path}: {label}: {', '.join(names)}", file=sys.stderr)
        print(
            f"ftkit error: this environment is not {path}; run `make install` in a fresh "
            "clone (or `rm -rf .venv && make install`)",
            file=sys.stderr,
        )
        return 1
    torch = f", torch {env['torch']}" if "torch" in env else ""
    beyond = f"; {len(extra)} more not in the lock: {', '.join(extra)}" if extra else ""
    print(f"installed exactly {path}: {len(lock)} packages{torch}{beyond}")
    return 0


def lower_bounds(setup_cfg: Path = SETUP_CFG) -> list[str]:
    """``name==X`` for every ``name>=X`` of install_requires and the LOWER_BOUND_EXTRAS."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg, encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    extras = parser["options.extras_require"]
    for extra in LOWER_BOUND_EXTRAS:
        lines += extras[extra].splitlines()
    pins = []
    for line in filter(None, (line.strip() for line in lines)):
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if floors:
            pins.append(f"{canonicalize_name(requirement.name)}=={max(floors, key=Version)}")
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    frozen = sub.add_parser("freeze", help="write the running environment as a lock")
    frozen.add_argument("lock", type=Path)
    frozen.add_argument("--title", default="ftkit's locked dependency set")
    sub.add_parser("check", help="compare the running environment with a lock").add_argument(
        "lock", type=Path
    )
    sub.add_parser("lower-bounds", help="setup.cfg's lower bounds as == pins")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        freeze(args.lock, args.title)
    elif args.command == "check":
        return check(args.lock)
    else:
        print("\n".join(lower_bounds()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
