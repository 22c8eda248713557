"""Where a job's Ray work runs."""

from __future__ import annotations

import os


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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    try:
        ray.init(address="auto", **init_kwargs)
    except ConnectionError:
        cpus = max(os.cpu_count() or 1, local_num_cpus) if local_num_cpus else None
        ray.init(num_cpus=cpus, **init_kwargs)
