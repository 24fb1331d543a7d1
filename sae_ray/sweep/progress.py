"""Live progress of a sweep on the driver's console (and so in `ray job logs`).

Tune's own table infers parameter columns from a static `param_space`; a define-by-run
Optuna space has none, so it shows no parameters. This callback prints its own, quietly:
one line when a trial starts (its parameters) and when it finishes a cycle (its
objectives), the table of running and best finished trials (with the counts and the best
feasible trial so far) when a trial ends, and a one-line heartbeat after `every` quiet
seconds.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray import tune
from tabulate import tabulate

from sae_ray.config.metrics import task_metrics

SHOW_FINISHED = 5  # the best few finished trials; a long sweep's table stays short


@dataclass
class TrialLine:
    params: dict[str, Any]
    status: str = "PENDING"
    cycle: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class SweepProgress(tune.Callback):
    def __init__(
        self,
        sweep: str,
        params: list[str],
        goals: list,
        cycles: int,
        every: float = 120.0,
        out: TextIO | None = None,
        beside: list[str] | None = None,
    ):
        self.sweep, self.params, self.goals, self.cycles = sweep, params, goals, cycles
        self.beside = task_metrics(False)[:1] if beside is None else beside
        self.every, self.out = every, out or sys.stdout
        self.trials: dict[str, TrialLine] = {}
        self.best: tuple[str, float] | None = None
        self._last = 0.0

    # -------------------------------------------------------------- Tune's events

    def on_trial_start(self, iteration, trials, trial, **info):
        line = self._line(trial)
        line.status = "RUNNING"
        chosen = ", ".join(f"{p}={v}" for p, v in line.params.items())
        self._say(f"trial_{trial.trial_id} started ({chosen or 'fixed config'})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = self._line(trial)
        line.status = "RUNNING"
        line.cycle = result.get("cycle")
        line.metrics = {k: result.get(k) for k in self._columns()}
        goal = self.goals[0]
        value = result.get(goal.key)
        feasible = result.get("feasible", True) is not False and _finite(value)
        if feasible and (self.best is None or goal.best(value, self.best[1]) != self.best[1]):
            self.best = (trial.trial_id, float(value))
        scores = ", ".join(f"{k} {v:.4g}" for k, v in line.metrics.items() if _finite(v))
        cycle = "-" if line.cycle is None else f"{int(line.cycle) + 1}/{self.cycles}"
        self._say(f"trial_{trial.trial_id} cycle {cycle}: {scores}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial).status = "DONE"
        self._print_table()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial).status = "ERROR"
        print(
            f"trial_{trial.trial_id} failed; the sweep goes on "
            f"(its error: results.csv, or {trial.path}/error.txt)",
            file=self.out,
        )
        self._print_table()

    def on_step_end(self, iteration, trials, **info):
        """A heartbeat while nothing else happens: one line, at most every `every` s."""
        if time.monotonic() - self._last >= self.every and self.trials:
            self._say(self.render().splitlines()[0].split("] ", 1)[1])

    # ------------------------------------------------------------------ display

    def _line(self, trial) -> TrialLine:
        if trial.trial_id not in self.trials:
            config = trial.config or {}
            self.trials[trial.trial_id] = TrialLine({p: config.get(p) for p in self.params})
        return self.trials[trial.trial_id]

    def _columns(self) -> list[str]:
        return list(dict.fromkeys([g.key for g in self.goals] + self.beside))

    def _say(self, text: str) -> None:
        """One line per event; the whole table only when a trial ends (a quiet console)."""
        self._last = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def _print_table(self) -> None:
        self._last = time.monotonic()
        print(self.render(), file=self.out, flush=True)

    def render(self) -> str:
        counts = {s: 0 for s in ("RUNNING", "DONE", "ERROR", "PENDING")}
        for line in self.trials.values():
            counts[line.status] += 1
        head = (
            f"[{time.strftime('%H:%M:%S')}] sweep {self.sweep}: "
            f"{counts['RUNNING']} running, {counts['DONE']} done, {counts['ERROR']} errored"
        )
        if self.best:
            head += f" | best {self.goals[0].key} = {self.best[1]:.4g} (trial_{self.best[0]})"
        goal = self.goals[0]

        def score(item: tuple[str, TrialLine]) -> float:
            value = item[1].metrics.get(goal.key)
            if not _finite(value):
                return math.inf
            return -value if goal.mode == "max" else value

        running = [(t, line) for t, line in self.trials.items() if line.status == "RUNNING"]
        ended = sorted(
            ((t, line) for t, line in self.trials.items() if line.status in ("DONE", "ERROR")),
            key=score,
        )
        rows = []
        for trial_id, line in running + ended[:SHOW_FINISHED]:
            cycle = "-" if line.cycle is None else f"{int(line.cycle) + 1}/{self.cycles}"
            rows.append(
                {
                    "trial": f"trial_{trial_id}",
                    "status": line.status.lower(),
                    **line.params,
                    "cycles done": cycle,
                    **line.metrics,
                }
            )
        if not rows:
            return head
        hidden = len(ended) - SHOW_FINISHED
        tail = f"\n(+{hidden} more finished: results.csv at the end)" if hidden > 0 else ""
        return f"{head}\n{tabulate(rows, headers='keys', floatfmt='.4g')}{tail}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
