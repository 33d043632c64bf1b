"""Stops that lose nothing: SIGTERM or a first Ctrl-C finishes the optimizer step, checkpoints
and exits; a second Ctrl-C stops at once.

Kaggle's time limit, a SLURM pre-emption and Ctrl-C all arrive as a signal. Python's default
(SIGINT raises ``KeyboardInterrupt`` wherever the run is; SIGTERM kills it) loses everything
since the last ``save_steps`` checkpoint. HF Trainer and Accelerate have no handler of their own
(Accelerate's launcher only relays the signal and kills after a few seconds), so the run keeps
one here, installed for the training loop only.

Under several processes the signal may reach one rank (a lost node, a direct ``kill``) or all of
them at different steps; every rank must stop after the *same* step or the checkpoint's
collectives would hang. ``Trainer.train_step`` therefore adds this process's vote to the token
count it already reduces over processes every step: the ranks agree with no extra collective.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

# The order of the votes in the reduced tensor (a count of ranks per signal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "resume with --resume_from_checkpoint latest"


class RunStopped(Exception):
    """The run stopped on a signal after checkpointing: not a mistake (not an ``FtkitError``),
    but not a success either; the exit code is the shell's for that signal (128 + number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def stopped_at(step: int, signum: int) -> RunStopped:
    name = signal.Signals(signum).name
    return RunStopped(f"stopped at step {step} on {name}; {RESUME_HINT}", signum)


def interrupted_at_once() -> RunStopped:
    return RunStopped(
        f"stopped at once on a second SIGINT; only complete checkpoints were kept: {RESUME_HINT}",
        signal.SIGINT,
    )


class StopRequest:
    """A context manager: while inside, SIGTERM and a first SIGINT set ``signum`` (the run
    stops after its current optimizer step); a second SIGINT raises ``KeyboardInterrupt`` at
    once. A repeated SIGTERM is ignored: launchers and schedulers often relay the one they got
    to a worker that had it already. Outside the main thread (where Python cannot install
    handlers) it does nothing and signals keep their default action."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning(
                "%s received: stopping after this optimizer step and its checkpoint (a second "
                "Ctrl-C stops at once)",
                signal.Signals(signum).name,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def votes(self) -> list[int]:
        """This process's vote, one count per ``STOP_SIGNALS`` entry (summed over ranks)."""
        return [int(self.signum == s) for s in STOP_SIGNALS]


def agreed_signal(votes: list[float]) -> int | None:
    """The signal every rank stops on, from the votes summed over ranks (SIGTERM first: a
    scheduler's stop outranks a Ctrl-C seen on another rank), or None to go on."""
    for signum, count in sorted(zip(STOP_SIGNALS, votes, strict=True), key=lambda v: -v[0]):
        if count > 0:
            return signum
    return None
