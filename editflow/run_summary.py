"""The end of a run in a few lines: where its results are, how the model compares with copying the source
for each kind of edit, where the time went, and the commands to run next."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path


class PhaseTimer:
    """Wall seconds per named phase. Phases nest: an inner phase's time is not counted again in the outer
    one, so the phases add up to the time they cover (e.g. encoding inside the training loop)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []  # [name, start, seconds spent in phases nested inside it]

    def begin(self, name: str) -> None:
        self._open.append([name, time.perf_counter(), 0.0])

    def end(self) -> None:
        name, start, inner = self._open.pop()
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
        if self._open:
            self._open[-1][2] += elapsed

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()


def process_times() -> tuple[float, float]:
    """(wall seconds since this process started, CPU seconds it has used)."""
    import psutil

    process = psutil.Process()
    cpu = process.cpu_times()
    return time.time() - process.create_time(), cpu.user + cpu.system


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def kind_table(result: dict) -> list[str]:
    """Per kind of edit (and overall): the model's mae against copy-the-source's, and success rates; with
    `result["start"]` (eval.at_start), the model's scores before its first step too."""
    model, baseline = result["model"], result["baseline"]
    start = result.get("start", {}).get("model")
    kinds = sorted(k.split("/", 1)[1] for k in model if k.startswith("mae/"))
    rows = [(kind, f"mae/{kind}", f"success/{kind}") for kind in kinds] + [("all", "mae", "success")]
    head = f"  {'kind':12s} {'model':>8s} {'copy-source':>12s}  {'beats copy':10s} {'success: model':>14s} {'copy':>5s}"
    lines = [head + (f"  {'at step 0: mae':>14s} {'success':>7s}" if start else "")]
    for kind, mae, success in rows:
        beats = "yes" if model[mae] < baseline[mae] else "NO"
        line = f"  {kind:12s} {model[mae]:8.4f} {baseline[mae]:12.4f}  {beats:10s}"
        if success in model:
            line += f" {model[success]:14.2f} {baseline[success]:5.2f}"
            if start and mae in start:
                line += f"  {start[mae]:14.4f} {start.get(success, float('nan')):7.2f}"
        lines.append(line)
    return lines


def summary(run_dir: Path, checkpoint: Path | None, grid: Path | None, result: dict, phases: dict[str, float],
            steps: int, example: tuple[Path, str] | None = None, start_grid: Path | None = None,
            cpu_seconds: float | None = None, processes: int = 1) -> str:
    """The text printed (and saved as summary.txt) at the end of a run.

    cpu_seconds: the CPU time of all `processes` of the job (default: this process's own)."""
    run = _shown(run_dir)
    lines = ["", f"Run finished: {run}"]
    if checkpoint is not None:
        lines.append(f"  checkpoint   {_shown(checkpoint)}")
    if grid is not None:
        lines.append(f"  sample grid  {_shown(grid)}  (source | target | edit, one row per kind of edit)")
    if start_grid is not None and start_grid != grid:
        lines.append(f"  at step 0    {_shown(start_grid)}  (the same edits before training)")
    if result:
        lines.append(f"  eval.json    {_shown(Path(run_dir) / 'eval.json')}")
        lines += ["", f"Held-out edits ({result['num_samples']}): mean absolute pixel error on [0, 1], lower is "
                      "better; success = the edited region right and the rest kept", *kind_table(result)]
    wall, cpu = process_times()
    cpu = cpu if cpu_seconds is None else cpu_seconds
    parts = [f"{name} {duration(s)}" for name, s in phases.items()]
    training = phases.get("training steps")
    if training:
        parts[list(phases).index("training steps")] += f" ({steps} steps, {steps / training:.1f}/s)"
    parts.append(f"startup and the rest {duration(max(0.0, wall - sum(phases.values())))}")
    cpu_note = f" CPU ({processes} processes)" if processes > 1 else " CPU"
    lines += ["", f"Time: {duration(wall)} wall, {duration(cpu)}{cpu_note}: " + ", ".join(parts)]
    lines += ["", "Next:"]
    if example is not None:
        image, instruction = example
        lines.append(f"  editflow edit --model {shlex.quote(run)} --image {shlex.quote(_shown(image))} "
                     f"--instruction {shlex.quote(instruction)} --out edited.png")
    else:
        lines.append(f"  editflow edit --model {shlex.quote(run)} --image IMAGE --instruction TEXT --out edited.png")
    lines.append(f"  editflow export {shlex.quote(run)} --out {shlex.quote(os.path.join('exports', Path(run).name))}")
    return "\n".join(lines) + "\n"
