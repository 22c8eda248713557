"""Where a job's Ray work runs, and how much of Ray's own logging a person sees."""

from __future__ import annotations

import logging
import os
import warnings

# Read by every process of a job that logs: the driver, and the workers it hands it to.
VERBOSE_VARIABLE = "GENGRAM_VERBOSE"
# Loggers whose INFO lines (a line per Train report, per Data operator, per DeepSpeed step) bury
# the one line per logged step that the jobs print themselves. The root logger ("") is among them:
# Ray Train's per-report line comes from a logger named by its file path, which only the root
# logger's level reaches (in a Train worker the root logger is Train's console handler).
CHATTY_LOGGERS = ("", "ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed", "mlflow")
# Ray Train V2 replaces `print` in its workers with one that logs through the root logger and also
# writes to the (wrapped) stdout: every line a worker prints reached the console twice. Train hands
# this variable from the driver to its controller and workers.
TRAIN_PRINT_PATCH_VARIABLE = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def set_verbose(verbose: bool) -> None:
    os.environ[VERBOSE_VARIABLE] = "1" if verbose else "0"
    quiet_libraries()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def quiet_libraries(verbose: bool | None = None) -> None:
    """Ray's and DeepSpeed's loggers at WARNING in this process, unless verbose. Ray sets its own
    levels when it is imported and when a session starts, so this runs after both."""
    verbose = is_verbose() if verbose is None else verbose
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # libraries' notes to their own developers (torch.distributed's renames and the like)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


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

    os.environ.setdefault(TRAIN_PRINT_PATCH_VARIABLE, "0")  # read when a Train run starts, not by ray.init
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
