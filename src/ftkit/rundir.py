"""Run identity and output-dir ownership: ftkit never mixes two runs, never deletes what it did not write.

Every training run has an *identity*: the recipe fields that change its result (model, data,
adapter, schedule, seed), and their fingerprint. ``output_dir/ftkit_run.json`` (the run marker)
holds that identity, the names of every artefact ftkit wrote there, and the identity of the
held-out split. The rules (docs/cli.md, "Output dir, checkpoints, merged dir"):

* an output dir holding files ftkit did not write (no marker lists them) is refused, always;
* a fresh run into a dir that holds another run (other fingerprint) is refused unless
  ``--overwrite_output_dir true``, which removes only that run's listed artefacts;
* re-running the *same* recipe replaces its own earlier artefacts, unless checkpoints are there
  (then resume, or pass ``--overwrite_output_dir true``);
* resuming requires the dir's run, and the checkpoint's, to have this recipe's fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ftkit.errors import ConfigError, FtkitError

logger = logging.getLogger(__name__)

RUN_MARKER = "ftkit_run.json"
RUN_FORMAT = "ftkit-run"
RUN_FORMAT_VERSION = 1
RESOLVED_CONFIG_NAME = "resolved_config.yaml"
CHECKPOINTS_DIR = "checkpoints"
# Written while training runs (before the final commit), so listed from the start.
WRITTEN_DURING_TRAINING = (RESOLVED_CONFIG_NAME, "metrics.jsonl", CHECKPOINTS_DIR)
# Hidden scratch that only ftkit creates (staging, trash, atomic-write temp files).
_SCRATCH_PREFIXES = (".ftkit-", ".adapter-staging-")
# Fields that say where or how often, not what: they do not change the trained weights.
NOT_IDENTITY = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "per_device_eval_batch_size",
        "gradient_checkpointing",  # recomputes the same activations
        "attn_implementation",  # the same attention by another kernel (tests/test_attention.py)
        # `auto` is resolved from the records (and written back into the recipe); the records
        # themselves are identified by the split identity below.
        "data_format",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "ddp_timeout",  # how long to wait for a lost node, not what is computed
        "allow_beyond_context",  # permits a max_length (itself identity), computes nothing
        "planned_peak_bytes",  # what `ftkit plan` predicted, not what is computed
        "planned_step_time_s",
        "num_proc",  # how many processes tokenise: the same tokens (tests/test_data_scale.py)
    }
)


class RunDirError(ConfigError):
    """An output dir holds another run or files ftkit did not write."""


def _scratch(name: str) -> bool:
    return name.startswith(_SCRATCH_PREFIXES) or ".tmp-" in name


# -- identity ---------------------------------------------------------------------------------------


def identity_fields(recipe) -> dict:
    """The recipe fields that change what a run computes."""
    return {k: v for k, v in recipe.to_dict().items() if k not in NOT_IDENTITY}


def fingerprint(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# How long a run trains: a resumed run may move its horizon (extend a finished run, as HF
# Trainer allows); every other identity field must match (docs/cli.md, "Extending a run").
HORIZON = ("max_steps", "num_train_epochs")


def lineage(fields: dict) -> str:
    """The fingerprint without the horizon: a run and its extensions share it."""
    return fingerprint({k: v for k, v in fields.items() if k not in HORIZON})


def horizon_moved(ours: dict, theirs: dict) -> bool:
    """Whether the two identities differ, and only in their horizon."""
    return fingerprint(ours) != fingerprint(theirs) and lineage(ours) == lineage(theirs)


def differing_fields(ours: dict, theirs: dict) -> list[str]:
    """``name: theirs -> ours`` for every identity field that differs."""
    names = sorted(set(ours) | set(theirs))
    return [
        f"{n}: {theirs.get(n, '<unset>')!r} -> {ours.get(n, '<unset>')!r}"
        for n in names
        if ours.get(n) != theirs.get(n)
    ]


# -- the marker -------------------------------------------------------------------------------------


@dataclass
class RunMarker:
    fingerprint: str
    fields: dict
    artefacts: list[str] = field(default_factory=list)
    split: dict | None = None
    complete: bool = False

    @classmethod
    def read(cls, output_dir: Path) -> RunMarker | None:
        path = Path(output_dir) / RUN_MARKER
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != RUN_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {RUN_FORMAT!r}")
            names = [f.name for f in dataclasses.fields(cls)]
            return cls(**{k: data[k] for k in names if k in data})
        except (ValueError, TypeError, KeyError) as err:
            raise RunDirError(
                f"{path} is not a valid ftkit run marker ({err}); move the dir away or pick "
                "another output_dir"
            ) from err

    def write(self, output_dir: Path) -> None:
        from ftkit.io import atomic_write_json

        data = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION}
        data.update(dataclasses.asdict(self))
        data["artefacts"] = sorted(set(self.artefacts))
        atomic_write_json(Path(output_dir) / RUN_MARKER, data)


def read_marker(output_dir) -> RunMarker | None:
    return RunMarker.read(Path(output_dir))


# -- one writer per output dir ----------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on the output dir itself, held by the run's main process for the
    run's life.

    Two runs started into one dir at once would both pass the marker checks and then write over
    each other. The kernel drops a ``flock`` when its holder exits, however it exits (a crash,
    SIGKILL, a lost node), so a stale lock never blocks the next run; locking the directory
    writes no file into it. Within one process the lock is shared (a library user may hold two
    ``Trainer`` objects for one dir); the last release drops it. A filesystem that cannot lock
    (some network mounts) is a warning: the run goes on without that protection.
    """

    _held: ClassVar[dict[str, list]] = {}  # realpath -> [fd, holders] in this process

    def __init__(self, output_dir):
        self.path = Path(output_dir)
        self._key: str | None = None
        self._created = False

    def acquire(self) -> RunLock:
        import fcntl

        self._created = not self.path.exists()  # removed again on release while still empty
        self.path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in self._held:
            self._held[key][1] += 1
        else:
            fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(
                    f"output_dir {self.path} is in use by another ftkit run "
                    f"({_lock_holder(key)}): wait for it to end, or pick another output_dir"
                ) from None
            except OSError as err:
                os.close(fd)
                logger.warning(
                    "cannot lock output_dir %s on this filesystem (%s): a second run started "
                    "into it meanwhile would not be refused",
                    self.path,
                    err,
                )
                return self
            self._held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        held = self._held[self._key]
        held[1] -= 1
        if held[1] == 0:
            os.close(held[0])  # closing drops the flock
            del self._held[self._key]
            if self._created:  # a run refused before writing anything leaves no empty dir
                with contextlib.suppress(OSError):
                    self.path.rmdir()
        self._key = None


def _lock_holder(path: str) -> str:
    """``pid N`` of the process holding ``path``'s flock, from /proc/locks where there is one."""
    with contextlib.suppress(OSError, ValueError):
        st = os.stat(path)
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and device in fields:
                return f"pid {fields[fields.index(device) - 1]}"
    return "its lock is held"


# -- checks before the model loads ----------------------------------------------------------------


def check_output_dir(output_dir) -> None:
    """An output dir that is a file, or that cannot be created or written, is one clear line."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a directory; pick a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir {path} cannot be created: {probe} is a file; pick another output_dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path} is not writable ({probe}); pick another output_dir")


SHARED_PROBE_PREFIX = ".ftkit-shared-"


def check_shared_output_dir(accelerator, output_dir, attempts: int = 10) -> None:
    """Refuse, on every process, an ``output_dir`` that not all nodes see (before the model loads).

    ftkit writes one run per output dir: the main process commits the adapter, the marker and the
    metrics, and every process writes its own state into each checkpoint there. A node-local dir
    would leave the other nodes' ranks' state nowhere a resume could find it. The main process
    writes a random probe file; every node's local main process looks for it (a few tries, for
    network filesystems that show new files late); the answers are gathered so that all nodes
    stop with the same line instead of waiting for each other.
    """
    if accelerator.num_processes == 1:
        return
    import secrets
    import socket
    import time

    from accelerate.utils import broadcast_object_list, gather_object

    path = Path(output_dir)
    created = False
    names = [None]
    if accelerator.is_main_process:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        names[0] = SHARED_PROBE_PREFIX + secrets.token_hex(8)
        (path / names[0]).write_text(names[0])
    probe = path / broadcast_object_list(names)[0]  # after the write: the others wait for it
    seen = True
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        for _ in range(attempts):
            seen = probe.is_file()
            if seen:
                break
            time.sleep(0.2)
    answers = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in answers if not ok]
    if not blind:
        return
    if accelerator.is_main_process and created:
        with contextlib.suppress(OSError):
            path.rmdir()  # only the (now empty) dir this check made
    who = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
    raise RunDirError(
        f"output_dir {path} is not shared between nodes ({who} cannot see the file rank 0 wrote "
        "there): put it on a filesystem every node mounts at the same path"
    )


def foreign_entries(output_dir: Path, marker: RunMarker | None) -> list[str]:
    """Names in ``output_dir`` that ftkit did not write (its scratch excepted)."""
    if not output_dir.is_dir():
        return []
    own = set(marker.artefacts if marker else ()) | {RUN_MARKER}
    return sorted(
        p.name for p in output_dir.iterdir() if p.name not in own and not _scratch(p.name)
    )


def claim(
    output_dir,
    recipe,
    *,
    overwrite: bool,
    resuming: bool,
    dry_run: bool = False,
    split: dict | None = None,
    fields: dict | None = None,
) -> RunMarker | None:
    """Make ``output_dir`` this run's, or refuse; returns the marker now in place.

    Call on the main process only, before anything is written into the dir. ``dry_run`` only
    checks (every process may, before the model loads) and changes nothing.
    """
    output_dir = Path(output_dir)
    fields = identity_fields(recipe) if fields is None else fields  # as given, before resolution
    ours = fingerprint(fields)
    marker = read_marker(output_dir)
    foreign = foreign_entries(output_dir, marker)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else ""
        )
        raise RunDirError(
            f"output_dir {output_dir} holds files ftkit did not write ({shown}); ftkit never "
            "overwrites or deletes them: move them away or pick another output_dir"
        )
    if marker is not None:
        same = marker.fingerprint == ours
        if resuming and not same and horizon_moved(fields, marker.fields):
            return marker  # an extension: recorded once the checkpoint allows it (move_horizon)
        if resuming and not same:
            raise RunDirError(
                f"output_dir {output_dir} holds another run (fingerprint {marker.fingerprint}, "
                f"this recipe {ours}; differs in {'; '.join(differing_fields(fields, marker.fields))}"
                "): resume with the recipe that made it, or pick another output_dir"
            )
        if resuming:
            return marker
        has_checkpoints = any((output_dir / CHECKPOINTS_DIR).glob("checkpoint-*"))
        if not overwrite and not same:
            raise RunDirError(
                f"output_dir {output_dir} holds another run (fingerprint {marker.fingerprint}; "
                f"differs in {'; '.join(differing_fields(fields, marker.fields))}): pass "
                "--overwrite_output_dir true to replace it, or pick another output_dir"
            )
        if not overwrite and has_checkpoints:
            raise RunDirError(
                f"output_dir {output_dir} holds checkpoints of this recipe: pass "
                "--resume_from_checkpoint latest to continue, or --overwrite_output_dir true to "
                "start over"
            )
        if dry_run:
            return marker
        remove_run(output_dir, marker)
    if dry_run:
        return None
    marker = RunMarker(ours, fields, [RUN_MARKER, *WRITTEN_DURING_TRAINING], split)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write(output_dir)
    return marker


def move_horizon(output_dir, fields: dict) -> None:
    """The dir's run is now ``fields``: the same run with a new horizon (main process)."""
    marker = read_marker(output_dir)
    marker.fingerprint, marker.fields = fingerprint(fields), fields
    marker.write(Path(output_dir))


def remove_run(output_dir: Path, marker: RunMarker) -> None:
    """Remove exactly the artefacts ``marker`` lists: all moved aside first, the marker last."""
    trash = Path(tempfile.mkdtemp(prefix=".ftkit-trash-", dir=output_dir))
    names = [n for n in marker.artefacts if n != RUN_MARKER] + [RUN_MARKER]
    for name in names:
        if (output_dir / name).exists():
            os.replace(output_dir / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    for stale in output_dir.iterdir():  # scratch of crashed ftkit writes
        if _scratch(stale.name):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- the final commit ------------------------------------------------------------------------------


def disk_full(err: BaseException, path=None) -> bool:
    """Whether ``err`` means the disk is full: ENOSPC, or torch's writer failing on a full disk
    (it reports "iostream error" / "file write failed" without an errno)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    if "No space left on device" in text or "ENOSPC" in text:
        return True
    if path is not None and ("iostream error" in text or "file write failed" in text):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(path).free < 64 * 2**20
    return False


def no_space_error(path, err: BaseException) -> FtkitError:
    return FtkitError(
        f"no space left on device at {path}: nothing was half-written (the scratch files were "
        f"removed); free some space and run again ({err.__class__.__name__})"
    )


@contextlib.contextmanager
def staging(output_dir) -> Iterator[Path]:
    """A scratch dir inside ``output_dir``, removed whatever happens; disk full is one line."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".ftkit-commit-", dir=output_dir))
    try:
        yield stage
    except Exception as err:
        if disk_full(err):
            raise no_space_error(output_dir, err) from err
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(output_dir, write: Callable[[Path], None]) -> list[str]:
    """All or nothing: ``write(stage)`` stages every final artefact, then they are renamed in.

    A failure while staging (disk full included) leaves ``output_dir`` as it was. The marker
    lists the new names before they appear, and is marked complete after the last rename;
    configs (``*config.json``) are renamed in last, so a reader never finds a config whose
    weights are missing. The staged files' checksums are staged with them (``ftkit.integrity``).
    """
    output_dir = Path(output_dir)
    with staging(output_dir) as stage:
        write(stage)
        from ftkit.integrity import write_manifest
        from ftkit.io import umask_modes

        write_manifest(stage)
        umask_modes(stage)
        staged = sorted(p.name for p in stage.iterdir())
        marker = read_marker(output_dir)
        if marker is not None:
            marker.artefacts = sorted(set(marker.artefacts) | set(staged))
            marker.complete = False
            marker.write(output_dir)
        last = [n for n in staged if n.endswith("config.json")]
        for name in [n for n in staged if n not in last] + last:
            target = output_dir / name
            if target.is_dir() and not (stage / name).is_dir():
                shutil.rmtree(target)
            os.replace(stage / name, target)
        if marker is not None:
            marker.complete = True
            marker.write(output_dir)
    return staged


def record_artefacts(output_dir, names) -> None:
    """Add ``names`` (written into ``output_dir`` by ftkit) to the run marker (main process)."""
    marker = read_marker(output_dir)
    if marker is not None:
        marker.artefacts = sorted(set(marker.artefacts) | set(names))
        marker.write(output_dir)


def record_split(output_dir, split: dict) -> None:
    """Store the held-out split's identity in the run marker (main process)."""
    marker = read_marker(output_dir)
    if marker is not None:
        marker.split = split
        marker.write(output_dir)


# -- merge targets ---------------------------------------------------------------------------------

MERGE_MARKER = "ftkit_merged.json"  # written into every merged-model dir ftkit makes
_RUN_SIGNS = (RUN_MARKER, RESOLVED_CONFIG_NAME, "adapter_config.json", "ftkit_adapter_config.json")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_merge_target(target, *, adapter_dir, base_dir, overwrite: bool) -> None:
    """Refuse a merge ``target`` whose replacement could delete anything ftkit did not write.

    A new or empty dir is fine; a non-empty one needs ``overwrite`` and must be a merged model
    ftkit wrote (its marker lists every file), never a dir that holds the adapter, the base
    model, another run or ``$FTKIT_HOME``.
    """
    from ftkit.embedded import ftkit_home

    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output_dir {target} is a file; pick a new directory")
    protected = {
        "the adapter being merged": Path(adapter_dir).resolve(),
        "$FTKIT_HOME": ftkit_home(),
    }
    if base_dir is not None and Path(base_dir).exists():
        protected["the base model"] = Path(base_dir).resolve()
    for what, path in protected.items():
        if _inside(path, target):
            raise ConfigError(
                f"--output_dir {target} would replace its own inputs: it holds {what} ({path}); "
                "pick a new dir"
            )
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"--output_dir {target} exists and is not empty; pick a new dir (or pass "
            "--overwrite true to replace a merged model ftkit wrote there)"
        )
    for sign in _RUN_SIGNS:
        found = next(iter(target.rglob(sign)), None)
        if found is not None:
            raise ConfigError(
                f"--output_dir {target} holds a training run ({found.relative_to(target)}); "
                "ftkit never replaces one with a merged model: pick a new dir"
            )
    marker = target / MERGE_MARKER
    listed = set()
    if marker.is_file():
        with contextlib.suppress(ValueError, OSError):
            listed = set(json.loads(marker.read_text(encoding="utf-8")).get("files", []))
    foreign = sorted(p.name for p in target.iterdir() if p.name not in listed | {MERGE_MARKER})
    if not marker.is_file() or foreign:
        shown = ", ".join(foreign[:5]) or "no ftkit merge marker"
        raise ConfigError(
            f"--output_dir {target} holds files ftkit did not write ({shown}); --overwrite only "
            "replaces a merged model ftkit wrote: move them away or pick a new dir"
        )


def write_merge_marker(directory: Path) -> None:
    """List the files of a merged-model dir, so ``--overwrite`` knows they are ftkit's.

    The checksums are listed too: they are written after this marker, to cover it as well.
    """
    from ftkit.integrity import MANIFEST_NAME
    from ftkit.io import atomic_write_json

    files = sorted({p.name for p in Path(directory).iterdir()} | {MANIFEST_NAME})
    atomic_write_json(Path(directory) / MERGE_MARKER, {"format": "ftkit-merged", "files": files})


# -- the held-out split's identity -----------------------------------------------------------------


def split_identity(data) -> dict:
    """Fingerprints of all the (tokenised) records and of the held-out ones, and their counts
    (``ftkit.data.split_identity``, computed once when the tokens are built)."""
    return data.split_identity


def check_split(run_dir, data, allow_changed: bool = False) -> None:
    """Refuse (or, with ``allow_changed``, warn loudly) when the rebuilt split is not the run's."""
    marker = read_marker(run_dir)
    recorded = marker.split if marker else None
    if not recorded:
        logger.warning(
            "%s records no held-out split identity (an older ftkit wrote it): cannot check that "
            "the rebuilt held-out records are the ones the run held out",
            run_dir,
        )
        return
    now = split_identity(data)
    if now["data"] == recorded["data"] and now["held_out"] == recorded["held_out"]:
        return
    message = (
        f"the data has changed since the run in {run_dir} was trained ({recorded['train_records']}"
        f" + {recorded['held_out_records']} records then, {now['train_records']} + "
        f"{now['held_out_records']} now): the rebuilt held-out split is not the one the run held "
        "out, and some of its records may have been trained on"
    )
    if not allow_changed:
        raise ConfigError(
            f"{message}; restore the training file, pass --dataset a held-out file, or pass "
            "--allow_changed_split true to score anyway"
        )
    logger.warning("!!! %s; scoring anyway (--allow_changed_split) !!!", message)
