"""Where a job's Ray work runs, and how much of Ray's own logging a person sees."""

from __future__ import annotations

import logging
import os

# Read by every process of a job that logs: the driver, and the workers it hands it to.
VERBOSE_VARIABLE = "GENGRAM_VERBOSE"
# Loggers whose INFO lines (a line per Train report, per Data operator, per DeepSpeed step) bury
# the one line per logged step that the jobs print themselves.
CHATTY_LOGGERS = ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed")


def set_verbose(verbose: bool) -> None:
    os.environ[VERBOSE_VARIABLE] = "1" if verbose else "0"
    quiet_libraries()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def quiet_libraries(verbose: bool | None = None) -> None:
    """Ray's and DeepSpeed's loggers at WARNING in this process, unless verbose. Ray sets its own
    levels when it is imported and when a session starts, so this runs after both."""
    level = logging.INFO if (is_verbose() if verbose is None else verbose) else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def ensure_ray(local_num_cpus: int | None = None, **init_kwargs) -> None:
    """Join the Ray cluster this job belongs to, starting a local one only if there is none.

    An initialised session is reused (tests, notebooks); RAY_ADDRESS (set by `ray job submit`,
    or by hand) names the cluster; otherwise a cluster already running on this machine
    (`ray start`) is joined, and failing that a local one is started for this process, with
    `local_num_cpus` logical CPUs if given. (Training workers hold their CPUs for the whole
    run, so a laptop-sized local cluster needs logical CPUs beyond them for Ray Data's
    streaming reads, or the reads wait forever.)
    """
    import ray

    if ray.is_initialized():
        return
    init_kwargs.setdefault("logging_level", logging.INFO if is_verbose() else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
    else:
        try:
            ray.init(address="auto", **init_kwargs)
        except ConnectionError:
            cpus = max(os.cpu_count() or 1, local_num_cpus) if local_num_cpus else None
            ray.init(num_cpus=cpus, **init_kwargs)
    quiet_libraries()
