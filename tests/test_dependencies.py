"""The dependency locks: what `make install` installs is what CI tested, and setup.cfg's ranges are
true at both ends (the newest set in requirements/lock.txt, the lower bounds in oldest.txt)."""

from __future__ import annotations

import configparser
import importlib.util
import re

import pytest
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK, OLDEST = REPO / "requirements" / "lock.txt", REPO / "requirements" / "oldest.txt"


def _lock_script():
    spec = importlib.util.spec_from_file_location("lock_script", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_script()


def declared() -> dict[str, Requirement]:
    """setup.cfg's requirements, core and every extra, by canonical name."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    for extra in parser["options.extras_require"].values():
        lines += extra.splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    return {canonicalize_name(r.name): r for r in requirements}


@pytest.mark.parametrize("path", [LOCK, OLDEST], ids=["lock", "oldest"])
def test_each_lock_sits_inside_setup_cfg_s_ranges(path):
    pins = lock.read_lock(path)
    ranges = declared()
    checked = [name for name in ranges if name in pins]
    for name in checked:
        assert ranges[name].specifier.contains(pins[name], prereleases=True), (name, pins[name])
    # every core requirement is locked (the oldest set leaves out the extras it does not test)
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    core = [Requirement(x).name for x in parser["options"]["install_requires"].split() if x]
    assert {canonicalize_name(name) for name in core} <= pins.keys()


def test_the_oldest_set_pins_exactly_setup_cfg_s_lower_bounds():
    """A lower bound nobody ran is a hope: each one in setup.cfg is the version oldest.txt holds,
    so raising or lowering one without re-running `make lock-oldest` fails here."""
    pins = lock.read_lock(OLDEST)
    bounds = [line.split("==") for line in lock.lower_bounds()]
    assert {"torch", "transformers", "peft", "accelerate", "datasets"} <= {n for n, _ in bounds}
    for name, version in bounds:
        assert Version(pins[name]) == Version(version), (name, pins[name], version)


def test_the_newest_set_is_newer_than_the_oldest_where_it_matters():
    newest, oldest = lock.read_lock(LOCK), lock.read_lock(OLDEST)
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        assert Version(newest[name]) >= Version(oldest[name]), name


def test_locks_pin_public_versions_one_per_package():
    for path in (LOCK, OLDEST):
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        pins = [line for line in lines if line]
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.]*", pin) for pin in pins), path
        assert len({pin.split("==")[0] for pin in pins}) == len(pins), path


def test_check_names_what_differs_from_the_lock(tmp_path, monkeypatch, capsys):
    path = tmp_path / "lock.txt"
    path.write_text("# a lock\ntorch==2.13.0\npeft==0.21.2\n")
    monkeypatch.setattr(lock, "installed", lambda: {"torch": "2.13.0+cpu", "peft": "0.21.2"})
    assert lock.check(path) == 0
    assert "installed exactly" in capsys.readouterr().out  # +cpu is the same release
    monkeypatch.setattr(lock, "installed", lambda: {"torch": "2.13.0", "peft": "0.20.0", "x": "1"})
    assert lock.check(path) == 1
    err = capsys.readouterr().err
    assert "peft 0.20.0 (locked 0.21.2)" in err and err.splitlines()[-1].startswith("ftkit error:")
    monkeypatch.setattr(lock, "installed", lambda: {"torch": "2.13.0"})
    assert lock.check(path) == 1
    assert "not installed: peft" in capsys.readouterr().err


def test_freeze_writes_the_environment_it_runs_in(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "installed", lambda: {"torch": "2.13.0+cpu", "accelerate": "1.16.0"})
    path = tmp_path / "sub" / "lock.txt"
    lock.freeze(path, "a title")
    text = path.read_text()
    assert text.startswith("# a title\n")
    assert lock.read_lock(path) == {"accelerate": "1.16.0", "torch": "2.13.0"}
    assert "torch==2.13.0  # installed here as 2.13.0+cpu" in text
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no scratch file left


def test_make_install_holds_every_pip_install_to_the_lock():
    makefile = (REPO / "Makefile").read_text()
    install = makefile[makefile.index("$(VENV)/.installed:") :].split("\n\n")[0]
    pip_lines = [line for line in install.splitlines() if "pip install" in line]
    assert pip_lines and all("-c $(LOCK)" in line for line in pip_lines), pip_lines
    assert "scripts/lock.py check $(LOCK)" in install  # and proves it before marking it done
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("make test-oldest")
