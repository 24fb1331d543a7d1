"""Starting or joining Ray with a console for people: Ray's and the workers' own output
goes to Ray's log files unless asked for."""

from __future__ import annotations

import logging
import os
import warnings

# Ray Train watches for nodes being drained (spot preemption) with one more actor per run:
# a process start, about a second of a trial on 2 CPUs (measured), for nothing on the one
# machine of a local cluster, which cannot lose a node and keep the run. Off on a cluster
# started here (its processes inherit this environment; a value the user sets wins).
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set in a `ray job submit` driver's environment


def connect(address: str | None, verbose: bool = False) -> None:
    """Start or join Ray. Unless `verbose`, the workers' and Ray's own output (worker-group
    start-ups, every Train report, Ray Data plans, raylet warnings, Tune's banner) stays in
    Ray's log files (`/tmp/ray/session_latest/logs`, the dashboard's Logs page)."""
    import ray

    from sae_ray.trial.sae_fit import HOLD_NOTE, HOLD_SAE_FIT_AT, KILL_SAE_FIT_AT

    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the engine that honours verbose=0
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _raylet_notes_to_log()
        # "Token authentication is enabled ...": a note on every local start, nothing to do
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if not ray.is_initialized():
        ours = address is None and not {"RAY_ADDRESS", PREEMPTION_WATCHER} & set(os.environ)
        if ours:
            os.environ[PREEMPTION_WATCHER] = "0"
        # The chaos tests' fault points, set in the CLI's environment: a cluster joined
        # with --address started its workers before, so they reach them through the job's
        # runtime_env (a submitted job's own carries them already; Ray refuses both).
        wanted = (KILL_SAE_FIT_AT, HOLD_SAE_FIT_AT, HOLD_NOTE)
        faults = {name: os.environ[name] for name in wanted if name in os.environ}
        if SUBMITTED_JOB in os.environ:
            faults = {}
        ray.init(
            address=address,
            runtime_env={"env_vars": faults} if faults else None,
            log_to_driver=verbose,
            configure_logging=False,
            logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        )
        if ours and len(ray.nodes()) > 1:
            del os.environ[PREEMPTION_WATCHER]  # joined a cluster of several machines
    if not verbose:
        import ray.data  # configures its loggers: keep their files, quiet their console

        for handler in logging.getLogger("ray.data").handlers:  # its notes go to ray-data.log
            if "File" not in type(handler).__name__:
                handler.setLevel(logging.ERROR)
        # Tune's "the callbacks took 2 s, which may be a performance bottleneck" notes
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)


def _raylet_notes_to_log() -> None:
    """Ray pushes raylet notes ("N PYTHON worker processes have been started ...") to every
    driver's console whatever `log_to_driver` says; send them to the log instead. Ray's
    private printer is wrapped only if it is there with the expected shape."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_sae_ray", False):
        return

    def quiet(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            logging.getLogger("ray").debug("raylet: %s", " ".join(data.get("lines", [])))
            return
        printer(data, ignore_prefix)

    quiet._sae_ray = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = quiet
