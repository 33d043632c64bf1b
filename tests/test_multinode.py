"""Two nodes simulated on one machine: two `ftkit launch` processes (`accelerate launch`
underneath) with the shipped multi-node config (``--machine_rank 0|1 --main_process_ip 127.0.0.1``), one CPU process each,
gloo over loopback, the embedded default recipe; as a user runs them on two hosts.

What is proven: each node's fresh ``FTKIT_HOME`` (or one shared) ends up with the complete base,
two nodes train the adapter of one node with two processes, node-local output dirs are refused
before the model loads, a crashed node stops the other at once and a stopped one within
``ddp_timeout``, both with one ``ftkit error:`` line, and the run resumes exactly from the last
complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import FTKIT_LAUNCH, REPO, accelerate_launch, kill_launch, launch_workers, start_launch
from safetensors.torch import load_file

from ftkit import checkpoint, embedded

pytestmark = pytest.mark.slow

CONFIG = REPO / "accelerate_configs" / "multi_node_2x2_fp16.yaml"
# On CPU: one process per node, fp32 (the Makefile's CPU flags for the DDP config).
CPU_FLAGS = ("--num_processes", "2", "--mixed_precision", "no")
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
SCRIPT = str(REPO / "recipes" / "alpaca_lora.py")
# The embedded default recipe, small: 16 records, 2 per process, 4 per step (5 epochs), long
# enough to stop a node after its first checkpoint (a step takes ~0.1 s).
RUN = {"num_samples": 16, "validation_size": 0, "per_device_train_batch_size": 2, "max_steps": 20}
LAUNCH_TIMEOUT = 240  # one two-node run takes 10-20 s here (plus ~10 s to build a fresh base)


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def two_nodes(logs: Path, outputs, values: dict, homes=(None, None)):
    """Start node 0 and node 1; yields both launches; kills whatever is left in the end."""
    port, launches = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for rank in (0, 1):
            env = dict(CPU_ENV)
            if homes[rank] is not None:
                env["FTKIT_HOME"] = str(homes[rank])
            args = [
                "--output_dir", str(outputs[rank]), *flags(values), "--",
                "--config_file", str(CONFIG), *CPU_FLAGS,
                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port),
            ]  # fmt: skip
            with open(logs / f"node{rank}.err", "w") as stderr:
                launches.append(start_launch(*args, stderr=stderr, launcher=FTKIT_LAUNCH, **env))
        yield launches
    finally:
        for launch in launches:
            kill_launch(launch)


def wait(launch, timeout: float = LAUNCH_TIMEOUT) -> int:
    return launch.wait(timeout=timeout)


def run_two_nodes(tmp_path: Path, outputs, values: dict, homes=(None, None)) -> list[str]:
    """Both nodes to the end; their stderr."""
    logs = tmp_path / f"logs-{time.monotonic_ns()}"
    with two_nodes(logs, outputs, values, homes) as launches:
        codes = [wait(launch) for launch in launches]
    errs = [(logs / f"node{rank}.err").read_text() for rank in (0, 1)]
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    return errs


def one_clear_line(err: str) -> str:
    """The node's last line on screen: its only ``ftkit error:`` line (``ftkit launch`` holds
    torchrun's failure report back; a traceback would end the output instead)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("ftkit error: "), err[-3000:]
    assert err.count("ftkit error:") == 1, err[-3000:]
    return lines[-1]


def adapter(output_dir: Path) -> dict:
    return load_file(Path(output_dir) / "adapter_model.safetensors")


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def logged_steps(output_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def wait_for(path: Path, launches, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert all(launch.poll() is None for launch in launches), "a node ended before " + str(path)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_node_adapter(tmp_path_factory):
    """The reference: one node, two CPU processes (the session's FTKIT_HOME)."""
    out = tmp_path_factory.mktemp("one-node") / "out"
    done = accelerate_launch(
        "-q", "--multi_gpu", *CPU_FLAGS, SCRIPT, "--output_dir", str(out), *flags(RUN),
        timeout=LAUNCH_TIMEOUT, **CPU_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return adapter(out)


@pytest.mark.parametrize("home", ["node-local", "shared"])
def test_two_nodes_on_fresh_homes_train_like_one_node(tmp_path, one_node_adapter, home):
    homes = (
        (tmp_path / "home0", tmp_path / "home1")
        if home == "node-local"
        else (tmp_path / "home",) * 2
    )
    out = tmp_path / "out"
    run_two_nodes(tmp_path, (out, out), RUN, homes)

    caches = [load_file(h / "tiny-llama" / "model.safetensors") for h in set(homes)]
    for cache in caches:  # every node's own cache holds the weights (deterministic: equal)
        assert cache.keys() == caches[0].keys() and len(cache) > 10
        assert all(cache[k].equal(caches[0][k]) for k in cache)
    for h in set(homes):
        assert (h / "tiny-llama" / embedded.STAMP_FILE).is_file()
    diff = max_rel_diff(adapter(out), one_node_adapter)
    print(
        f"2 nodes x 1 process vs 1 node x 2 processes ({home} FTKIT_HOME): max rel diff {diff:.2e}"
    )
    assert diff <= 1e-6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["techniques"]["world_size"] == 2 and metrics["steps"] == RUN["max_steps"]


def test_node_local_output_dirs_are_refused_before_the_model_loads(tmp_path):
    outputs = (tmp_path / "node0-disk" / "out", tmp_path / "node1-disk" / "out")
    logs = tmp_path / "logs"
    with two_nodes(logs, outputs, RUN) as launches:
        codes = [wait(launch) for launch in launches]
    assert all(code != 0 for code in codes)
    for rank in (0, 1):
        line = one_clear_line((logs / f"node{rank}.err").read_text())
        assert line == (
            f"ftkit error: output_dir {outputs[rank]} is not shared between nodes (rank 1 on "
            f"{socket.gethostname()} cannot see the file rank 0 wrote there): put it on a "
            "filesystem every node mounts at the same path"
        )
    assert not outputs[0].exists() and not outputs[1].exists()  # nothing left behind


def test_a_crashed_node_stops_the_other_at_once_and_the_run_resumes_exactly(
    tmp_path, one_node_adapter
):
    """Node 1 SIGKILLed after the first checkpoint: node 0 exits non-zero long before
    ddp_timeout with one line naming the last complete checkpoint; both nodes resume from it
    and end with the straight run's adapter (that of one node, equal to two nodes' above)."""
    out, ddp_timeout = tmp_path / "out", 120
    values = {**RUN, "save_steps": 2, "save_total_limit": 3, "ddp_timeout": ddp_timeout}
    logs = tmp_path / "logs"
    with two_nodes(logs, (out, out), values) as (node0, node1):
        wait_for(out / "checkpoints" / "checkpoint-2", (node0, node1))
        kill_launch(node1)
        killed = time.monotonic()
        code = wait(node0, timeout=ddp_timeout)
        elapsed = time.monotonic() - killed
    print(f"node 0 exited {elapsed:.1f} s after node 1 was killed (ddp_timeout {ddp_timeout} s)")
    assert code != 0 and elapsed < ddp_timeout / 2
    line = one_clear_line((logs / "node0.err").read_text())
    match = re.fullmatch(
        r"ftkit error: lost contact with another node or process of the run \(a process of the "
        r"run went away: .*\); the last complete checkpoint is (.*/checkpoint-(\d+)): once every "
        r"node is up, rerun with --resume_from_checkpoint latest",
        line,
    )
    assert match, line
    last, step = Path(match.group(1)), int(match.group(2))
    assert last == checkpoint.checkpoints(out)[-1] and 2 <= step < RUN["max_steps"]
    assert checkpoint.missing_ranks(last, 2) == [] and checkpoint.read_state(last)["step"] == step
    assert not list((out / "checkpoints").glob(".checkpoint-*"))  # no half-written scratch

    run_two_nodes(tmp_path, (out, out), {**values, "resume_from_checkpoint": "latest"})
    diff = max_rel_diff(adapter(out), one_node_adapter)
    print(f"resumed from {last.name} vs straight: max rel diff {diff:.2e}")
    assert diff <= 1e-6
    assert logged_steps(out) == list(range(1, RUN["max_steps"] + 1))


def test_a_node_that_stops_answering_ends_the_run_within_ddp_timeout(tmp_path):
    """Node 1's worker SIGSTOPped after the first checkpoint: node 0 waits ddp_timeout, then
    exits non-zero with one line; the checkpoints stay complete."""
    out, ddp_timeout, margin = tmp_path / "out", 15, 20
    values = {**RUN, "save_steps": 2, "ddp_timeout": ddp_timeout}
    logs = tmp_path / "logs"
    with two_nodes(logs, (out, out), values) as (node0, node1):
        wait_for(out / "checkpoints" / "checkpoint-2", (node0, node1))
        for worker in launch_workers(node1):
            worker.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = wait(node0, timeout=ddp_timeout + margin)
        elapsed = time.monotonic() - stopped
    print(f"node 0 exited {elapsed:.1f} s after node 1 stopped (ddp_timeout {ddp_timeout} s)")
    assert code != 0 and elapsed <= ddp_timeout + margin
    line = one_clear_line((logs / "node0.err").read_text())
    assert line.startswith(
        "ftkit error: lost contact with another node or process of the run (no answer within "
        f"ddp_timeout={ddp_timeout} s: Timed out waiting {ddp_timeout * 1000}ms for "
    ), line
    assert "the last complete checkpoint is " in line
    found = checkpoint.checkpoints(out)
    assert found and all(checkpoint.missing_ranks(c, 2) == [] for c in found)
