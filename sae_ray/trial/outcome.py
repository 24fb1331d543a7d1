"""What a trial's driver hears from its Train run: each cycle's metrics, or the one error
that ends it.

`Forward` runs in the run's controller, which unpickles it by reference: this module
imports nothing but Ray, so a controller does not import torch's model stack, sklearn and
the method's modules (seconds of CPU per trial on a small machine) to forward a dict."""

from __future__ import annotations

from ray.train import UserCallback

# What a worker-group restart would only raise again: bad settings reaching a stage (a
# searched layer the model lacks), NaN or Inf activations, a diverged SAE. Ray Train
# restarts a group for any worker error; these end the trial at once instead.
DETERMINISTIC = (ValueError, FloatingPointError)
FAILED = "__failed__"


class TrialFailed(RuntimeError):
    """A trial stopped by an error a restart would repeat; the message is the worker's."""


class Forward(UserCallback):
    """Hands each cycle's metrics to the driver through `sink`, a Ray queue, and ends the
    run without restarts on a deterministic worker error (raising here fails the
    controller, which Ray Train does not retry).

    Not Ray's `ray.tune.integration.ray_train.TuneReportCallback`, which does the first half
    for a Train run inside a Tune trial: it refuses to start outside a Tune session (`sae-ray
    run` and the replay of a finished point report to a list), forwards rank 0's metrics
    (a cycle's come from the rank that has them), and passes no worker's error on. The
    driver reads `sink` in Tune's own thread and records what it reported for the replay."""

    def __init__(self, sink):
        self.sink = sink

    def after_report(self, run_context, metrics, checkpoint):
        cycle = next((m for m in metrics if "cycle" in m), None)
        if cycle is not None:
            self.sink.put(dict(cycle))

    def after_exception(self, run_context, worker_exceptions):
        fatal = [e for e in worker_exceptions.values() if isinstance(e, DETERMINISTIC)]
        if fatal:
            first = (str(fatal[0]).strip().splitlines() or [""])[0]
            reason = f"{type(fatal[0]).__name__}: {first}"
            self.sink.put({FAILED: reason})
            raise TrialFailed(reason)
