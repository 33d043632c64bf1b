"""Preprocessing at real scale: how long ``ftkit train`` takes to reach its first optimizer step,
and how much memory its process tree holds, for 5 k, 52 k and 500 k Alpaca records.

The records are the shared Alpaca file made larger by varying its text (copy ``c`` of a record
gets `` (variant c)`` after its instruction and `` (c)`` after a non-empty output, so every
record is distinct and the two empty outputs stay bad records); they are written into the output
dir, never into the repository. Each setting runs twice with the same fresh ``$FTKIT_HOME`` and
datasets cache: the first start builds whatever the code caches, the second may reuse it. One
process is ``python -m ftkit train``; two are ``accelerate launch --multi_gpu --num_processes 2``
on CPU (gloo). The model is a tiny LLaMA with the real 32,000-token LLaMA-2 vocabulary, so the
data dominates the memory.

Measured from outside, the same way for any ftkit version (``--src`` puts another checkout's
``src`` first on ``PYTHONPATH``: the "before" rows):

- time to the first step: from the start until ``metrics.jsonl`` holds the first step's row;
- peak memory: the process tree sampled every 0.2 s: the largest sum over its processes of RSS
  and of PSS (each shared page divided among the processes that map it: what the processes
  really hold together, where the RSS sum counts a page that two map, or that a forked
  tokenising worker shares with its parent, twice), and the largest RSS of one process;
- the cache: ``hit`` / ``built`` from the run's own log line (absent: the code caches nothing).

    python -m ftkit.lab.databench --dataset ../shared/data/alpaca_5000.json \\
        --tokenizer ../shared/fixtures/llama2-tokenizer --output_dir outputs/databench \\
        --results_dir results/data-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from ftkit.console import run_main
from ftkit.data import CACHE_BUILT, CACHE_HIT  # the lines a run logs when it reuses / builds
from ftkit.errors import FtkitError
from ftkit.io import atomic_write_json, atomic_write_text
from ftkit.lab.launch import child_env, recipe_flags

DEFAULT_RUNS = ("5000x1", "5000x2", "52000x1", "52000x2", "500000x1", "500000x2")
SAMPLE_EVERY_S = 0.2


def scaled_records(source: str | Path, n_records: int, path: Path) -> Path:
    """``n_records`` Alpaca records made from ``source``'s by varying their text (kept if there).

    Written record by record (a 500 k list would cost this process a GiB), then renamed into
    place, so an interrupted run never leaves a short file behind.
    """
    if path.is_file():
        return path
    records = json.loads(Path(source).read_text(encoding="utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with scratch.open("w", encoding="utf-8") as fh:
        fh.write("[")
        for index in range(n_records):
            copy, position = divmod(index, len(records))
            record = dict(records[position])
            if copy:
                record["instruction"] = f"{record['instruction']} (variant {copy})"
                if record["output"].strip():
                    record["output"] = f"{record['output']} ({copy})"
            fh.write((", " if index else "") + json.dumps(record))
        fh.write("]")
    os.replace(scratch, path)
    return path


class TreeMemory:
    """Samples a process and its descendants; keeps the largest summed RSS and PSS seen."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = self.peak_process_rss = 0
        self.processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY_S)

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        figures = [_smaps_rollup(process.pid) for process in tree]
        rss = [f.get("Rss", 0) for f in figures]
        pss = sum(f.get("Pss", 0) for f in figures)
        self.peak_rss, self.peak_pss = max(self.peak_rss, sum(rss)), max(self.peak_pss, pss)
        self.peak_process_rss = max(self.peak_process_rss, *rss)
        self.processes = max(self.processes, len(tree))


def _smaps_rollup(pid: int) -> dict[str, int]:
    """The kernel's per-process totals (bytes); {} once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    figures = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            figures[name] = int(parts[0]) * 1024
    return figures


def first_step_row(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and '"loss"' in path.read_text(encoding="utf-8")


def train_command(processes: int) -> list[str]:
    """``ftkit train`` in this process's Python; two processes through ``accelerate launch``."""
    if processes == 1:
        return [sys.executable, "-m", "ftkit", "train"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m", "ftkit", "train",
    ]  # fmt: skip


def measure_start(command: list[str], env: dict, run_dir: Path, log: Path) -> dict:
    """One start: time to the first step row, the process tree's peaks, what the cache did."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    first_step = None
    with log.open("w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(child.pid) as memory:
            while child.poll() is None:
                if first_step is None and first_step_row(run_dir):
                    first_step = time.perf_counter() - start
                time.sleep(0.1)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if child.returncode != 0:
        raise FtkitError(f"{shlex.join(command)} failed (see {log}):\n{text[-3000:]}")
    cache = "hit" if CACHE_HIT in text else "built" if CACHE_BUILT in text else None
    return {
        "first_step_s": first_step,
        "wall_s": wall,
        "peak_rss_bytes": memory.peak_rss,
        "peak_pss_bytes": memory.peak_pss,
        "peak_process_rss_bytes": memory.peak_process_rss,
        "processes_seen": memory.processes,
        "cache": cache,
        "load_average_1m": load,
    }


def run_setting(args, n_records: int, processes: int, model_dir: Path, out: Path) -> list[dict]:
    """``args.starts`` starts of one (records, processes) setting, sharing one fresh cache."""
    data = scaled_records(args.dataset, n_records, out / "data" / f"alpaca_{n_records}.json")
    setting = out / args.label / f"{n_records}x{processes}"
    shutil.rmtree(setting, ignore_errors=True)  # a fresh cache: the first start builds
    setting.mkdir(parents=True)
    env = {
        **child_env(),
        "FTKIT_HOME": str(setting / "ftkit_home"),
        "HF_DATASETS_CACHE": str(setting / "datasets_cache"),
    }
    del env["TOKENIZERS_PARALLELISM"]  # as users run: the tokenizer's own threads on (its default)
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    rows = []
    for start in range(1, args.starts + 1):
        run_dir = setting / f"run{start}"
        recipe = {
            "model_name_or_path": str(model_dir),
            "dataset": str(data),
            "max_length": args.max_length,
            "validation_size": args.validation_size,
            # One held-out record per batch: the LM head's logits of an 8-record batch (8 x 256
            # x 32,000 floats) would set the peak, and vary with which records are held out.
            "per_device_eval_batch_size": 1,
            "skip_bad_records": True,  # the Alpaca file's two empty outputs, in every copy
            "max_steps": 1,
            "output_dir": str(run_dir),
            **({"num_proc": args.num_proc} if args.num_proc is not None else {}),
        }
        command = train_command(processes) + recipe_flags(recipe)
        row = {
            "label": args.label,
            "records": n_records,
            "file_bytes": data.stat().st_size,
            "processes": processes,
            "start": start,
            **measure_start(command, env, run_dir, setting / f"run{start}.log"),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def mib(n_bytes: float | None) -> str:
    return "—" if n_bytes is None else f"{n_bytes / 2**20:.0f}"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


PEAKS = {"peak_rss_bytes": "RSS", "peak_pss_bytes": "PSS"}


def data_share(rows: list[dict], label: str, processes: int, key: str) -> dict[int, int]:
    """Per record count, the first start's peak minus the smallest setting's: what the data adds
    to the model, torch and the interpreter."""
    first = {
        r["records"]: r[key]
        for r in rows
        if r["label"] == label and r["processes"] == processes and r["start"] == 1
    }
    if len(first) < 2:
        return {}
    base = first[min(first)]
    return {n: peak - base for n, peak in first.items() if n != min(first)}


def goals(rows: list[dict], label: str) -> list[str]:
    """The issue's goals, checked on ``label``'s rows (those the rows can answer)."""
    mine = [r for r in rows if r["label"] == label]
    lines = []
    later = [r for r in mine if r["start"] > 1]
    if later:
        hits = sum(r["cache"] == "hit" for r in later)
        lines.append(
            f"- the second start skips tokenisation (the run logs a cache hit): {hits} of "
            f"{len(later)} second starts"
        )
    for r in mine:
        if r["records"] == max(x["records"] for x in mine) and r["first_step_s"] is not None:
            lines.append(
                f"- {r['records']:,} records, {r['processes']} process(es), start {r['start']}: "
                f"first step after {r['first_step_s']:.0f} s (goal < 120 s: "
                f"{'met' if r['first_step_s'] < 120 else 'missed'})"
            )
    sizes = {r["records"]: r["file_bytes"] for r in mine}
    for processes in sorted({r["processes"] for r in mine}):
        for key, name in PEAKS.items():
            for n, share in data_share(rows, label, processes, key).items():
                if n != max(sizes):
                    continue  # the goal is the largest set's; a small file's share is noise
                ok = "met" if share < 2 * sizes[n] else "missed"
                lines.append(
                    f"- data's share of the peak {name} (first start minus the "
                    f"{min(sizes):,}-record one), {n:,} records, {processes} process(es): "
                    f"{mib(share)} MiB for a {mib(sizes[n])} MiB file (goal < 2× the file: {ok})"
                )
    one, two = (data_share(rows, label, p, "peak_pss_bytes") for p in (1, 2))
    for n in sorted(set(one) & set(two) & {max(sizes)}):
        lines.append(
            f"- two processes vs one, {n:,} records, data's share of the PSS: {mib(two[n])} vs "
            f"{mib(one[n])} MiB (goal: not doubled: {'met' if two[n] < 2 * one[n] else 'missed'})"
        )
    return lines


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Preprocessing at scale: time to the first step and peak memory",
        "",
        f"Machine: {meta['machine']}. `make bench-data` runs the `after` rows; every row's "
        "command is in `databench.json`.",
        f"Tiny LLaMA (hidden {meta['hidden']}, {meta['layers']} layers) with the LLaMA-2 "
        f"tokenizer, max_length {meta['max_length']}, validation_size {meta['validation_size']} "
        "(evaluated one record a batch), max_steps 1, skip_bad_records, `TOKENIZERS_PARALLELISM` unset (the tokenizer's "
        "threads on, its default); records made from `alpaca_5000.json` by varying the text. "
        "Each setting starts twice on one fresh `$FTKIT_HOME`. Peaks of the process tree, "
        "sampled every 0.2 s: summed RSS, summed PSS (shared pages divided among the processes "
        "that map them), and the largest single process's RSS. The machine is shared with "
        "other work: its 1-minute load average at each start is in the last column.",
        "",
        "| code | records | file MiB | processes | start | first step s | whole run s "
        "| RSS MiB | PSS MiB | one process RSS MiB | cache | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (r["label"] != "before", r["label"], r["records"]))
    for r in order:
        lines.append(
            f"| {r['label']} | {r['records']:,} | {mib(r['file_bytes'])} | {r['processes']} "
            f"| {r['start']} | {seconds(r['first_step_s'])} | {seconds(r['wall_s'])} "
            f"| {mib(r['peak_rss_bytes'])} | {mib(r['peak_pss_bytes'])} "
            f"| {mib(r.get('peak_process_rss_bytes'))} | {r['cache'] or '—'} "
            f"| {r['load_average_1m']:.2f} |"
        )
    for label in sorted({r["label"] for r in rows}):
        found = goals(rows, label)
        if found:
            lines += ["", f"`{label}`:", "", *found]
    return "\n".join(lines) + "\n"


def parse_runs(text: str) -> list[tuple[int, int]]:
    """``52000x1,52000x2`` -> [(52000, 1), (52000, 2)]."""
    runs = []
    for item in text.split(","):
        records, _, processes = item.strip().partition("x")
        if not (records.isdigit() and processes.isdigit()):
            raise FtkitError(f"--runs item {item!r} is not RECORDSxPROCESSES (e.g. 52000x2)")
        runs.append((int(records), int(processes)))
    return runs


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m ftkit.lab.databench")
    parser.add_argument("--dataset", required=True, help="Alpaca JSON whose records are varied")
    parser.add_argument("--tokenizer", required=True, help="the LLaMA-2 tokenizer directory")
    parser.add_argument("--output_dir", default="outputs/databench")
    parser.add_argument("--results_dir", default=None, help="merge the rows into its report")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="RECORDSxPROCESSES,...")
    parser.add_argument("--starts", type=int, default=2, help="starts per setting, one cache")
    parser.add_argument("--label", default="after", help="the code measured: after, before...")
    parser.add_argument("--src", default=None, help="another checkout's src/ (the old code)")
    parser.add_argument("--num_proc", type=int, default=None, help="the recipe's (default: its)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--validation_size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    from ftkit.lab.ablation import machine
    from ftkit.lab.throughput import build_model

    out = Path(args.output_dir)
    model_dir = build_model(out, args.tokenizer, args.hidden, args.layers)
    command = shlex.join(["python", "-m", "ftkit.lab.databench", *(argv or sys.argv[1:])])
    rows = []
    for n_records, processes in parse_runs(args.runs):
        rows += [
            {**row, "command": command}
            for row in run_setting(args, n_records, processes, model_dir, out)
        ]
    meta = {
        "machine": machine(),
        "max_length": args.max_length,
        "validation_size": args.validation_size,
        "hidden": args.hidden,
        "layers": args.layers,
    }
    for where in {out, Path(args.results_dir)} if args.results_dir else {out}:
        merged = merge_rows(where / "databench.json", rows)
        atomic_write_json(where / "databench.json", {"meta": meta, "rows": merged})
        atomic_write_text(where / "databench.md", report(merged, meta))
    print(report(rows, meta))
    return rows


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Earlier rows of ``path`` with this run's in place of the same (code, records, processes,
    start): the before and after figures come from separate invocations."""

    def key(r):
        return (r["label"], r["records"], r["processes"], r["start"])

    kept = json.loads(path.read_text())["rows"] if path.is_file() else []
    new = {key(r) for r in rows}
    return [r for r in kept if key(r) not in new] + rows


if __name__ == "__main__":
    sys.exit(run_main(lambda: main() and 0))  # the rows returned are for callers: exit 0
