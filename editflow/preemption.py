"""Stopping cleanly when SLURM or the cluster asks: signals, pid files for the sbatch template to signal,
the PREEMPTED marker that makes the template requeue, and the ranks' vote on when to stop."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)
MARKER = "PREEMPTED"


class Preemption:
    def __init__(self, accelerator: Accelerator, run_dir: Path, stop_after: int | None = None):
        self.accelerator, self.run_dir, self.stop_after = accelerator, run_dir, stop_after
        self.requested = False  # a signal reached this process
        self.signals: list[str] = []  # the names of those signals, in order
        self.preempted = False  # the run stopped early, with a checkpoint
        self._vote: torch.Tensor | None = None  # the ranks' previous stop vote (see should_stop)
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # SLURM's warning before the time limit, preemption
            signal.signal(sig, self._request)
        self._register_process()

    def _request(self, signum, frame) -> None:
        """A first signal stops at the next step boundary, with a checkpoint. The same SIGTERM or SIGINT again
        stops now, without one (a person insisting; SLURM sends its warning as USR1, then TERM once)."""
        name = signal.Signals(signum).name
        if name in self.signals and signum != signal.SIGUSR1:
            raise KeyboardInterrupt(f"a second {name}: stopped in the middle of a step, without a checkpoint")
        self.signals.append(name)
        again = ""
        if signum != signal.SIGUSR1:
            again = f" ({'Ctrl-C' if signum == signal.SIGINT else name} again: stop now, without one)"
        log.warning("received %s: checkpointing at the next step boundary%s", name, again)
        self.requested = True

    @property
    def interrupted(self) -> bool:
        """The run was stopped by Ctrl-C (not by SLURM or the cluster: no requeue)."""
        return "SIGINT" in self.signals

    @contextlib.contextmanager
    def graceful_ctrl_c(self):
        """Within the training loop a first Ctrl-C stops like SIGTERM, with a checkpoint at the next step
        boundary; a second stops at once. Elsewhere (model loading, evaluation) Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _register_process(self) -> None:
        """Pid file per host and rank (the SLURM template signals exactly these); clear a PREEMPTED marker."""
        pids = self.run_dir / ".pids"
        pids.mkdir(parents=True, exist_ok=True)
        pid_file = pids / f"{socket.gethostname()}-{self.accelerator.process_index}"
        pid_file.write_text(str(os.getpid()))
        atexit.register(pid_file.unlink, missing_ok=True)
        if self.accelerator.is_main_process:
            (self.run_dir / MARKER).unlink(missing_ok=True)

    def should_stop(self, steps_this_run: int) -> bool:
        """Whether every rank stops at this step boundary (a signal reached one of them, or trainer.stop_after).
        On an accelerator the ranks' vote is read one boundary late: reading it then waits only for the
        previous step, whose successor is already queued, so the device never idles for it."""
        acc = self.accelerator
        if self.stop_after and steps_this_run >= self.stop_after:
            return True  # the same on every rank: no vote needed
        if acc.num_processes == 1:
            return self.requested
        # torch.full fills on the device (torch.tensor(x, device=...) would copy from the host and wait)
        vote = acc.reduce(torch.full((), float(self.requested), device=acc.device), "max")
        if acc.device.type == "cpu":
            return bool(vote)
        previous, self._vote = self._vote, vote
        return previous is not None and bool(previous)

    def mark(self, step: int) -> None:
        """The run stopped early at `step`: PREEMPTED tells the SLURM template to requeue the job (not after a
        Ctrl-C: a person stopped it)."""
        self.preempted = True
        log.warning("stopped at step %d with a checkpoint; resume with trainer.resume=auto", step)
        if self.accelerator.is_main_process and not self.interrupted:
            (self.run_dir / MARKER).write_text(str(step))
