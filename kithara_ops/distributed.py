"""Joining a multi-process (multi-controller) JAX run before anything touches a device.

In a multi-process run every process runs the same program on its own devices, and
``jax.distributed.initialize`` connects them through a coordinator (process 0's
``HOST:PORT``). After that ``jax.devices()`` lists the devices of all processes, the mesh
spans them, and every jitted step runs on all of them together.

``initialize`` must run before the first JAX computation of the process (before a model is
built or an array is placed), because JAX fixes its device list when its backend starts.

Without explicit options nothing is initialized, except where the environment clearly is a
multi-process job that JAX can read by itself:

- a SLURM job step with more than one task (``SLURM_JOB_ID`` and ``SLURM_NTASKS`` > 1),
- or ``KITHARA_OPS_DISTRIBUTED=auto`` (any cluster JAX detects: TPU pods, Kubernetes,
  Open MPI, ...).

``KITHARA_OPS_DISTRIBUTED=off`` turns the SLURM detection off (e.g. for one process per
allocation).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kithara_ops.errors import ConfigError

log = logging.getLogger("kithara_ops")

ENV_SWITCH = "KITHARA_OPS_DISTRIBUTED"
"""``auto``: let JAX detect the cluster; ``off``: never initialize without explicit options."""

_initialized = False


def auto_detect() -> bool:
    """Whether the environment asks for ``jax.distributed.initialize()`` with no arguments."""
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch == "auto":
        return True
    if switch == "off":
        return False
    try:
        tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        tasks = 1
    return "SLURM_JOB_ID" in os.environ and tasks > 1


def check_options(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Refuse a partial or inconsistent set of distributed options with a ``ConfigError``."""
    given = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise ConfigError(
            f"A multi-process run needs coordinator, num_processes and process_id together; "
            f"missing: {', '.join(missing)}."
        )
    if missing:
        return
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"coordinator must be HOST:PORT (process 0's address), got {coordinator!r}."
        )
    for name in ("num_processes", "process_id"):
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if num_processes < 1:
        raise ConfigError(f"num_processes must be a positive integer, got {num_processes!r}.")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"process_id must be between 0 and num_processes - 1 ({num_processes - 1}), "
            f"got {process_id!r}."
        )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process JAX run; call it before any JAX computation. Idempotent.

    Args:
      coordinator: process 0's ``HOST:PORT``, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's rank, ``0 <= process_id < num_processes``.

    With all three, ``jax.distributed.initialize`` connects to the coordinator. With none,
    it is called without arguments only when ``auto_detect()`` says so (SLURM with several
    tasks, or ``KITHARA_OPS_DISTRIBUTED=auto``). On CPU the cross-process collectives use
    Gloo (unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chooses otherwise).

    Returns:
      Whether JAX's distributed system is initialized after the call.

    Raises:
      ConfigError: when only some of the options are given, or one is out of range.
    """
    global _initialized
    check_options(coordinator, num_processes, process_id)
    import jax

    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return True
    explicit = coordinator is not None
    if not explicit and not auto_detect():
        return False
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if explicit:
            log.info("Joining %s as process %d of %d.", coordinator, process_id, num_processes)
            jax.distributed.initialize(
                coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
            )
        else:
            log.info("Initializing JAX distributed from the environment.")
            jax.distributed.initialize()
    except RuntimeError as err:
        if "before" not in str(err):
            raise
        raise ConfigError(
            "JAX was already used in this process, so it cannot join a multi-process run: "
            "call kithara_ops.distributed.initialize(...) before building the model."
        ) from None
    _initialized = True
    return True


def process_local(tree: Any) -> Any:
    """``tree`` with every array readable in this process.

    With one process it is returned as is. With several, arrays that span other
    processes' devices are gathered into full NumPy copies on every process; this is a
    collective, so every process must call it at the same point.
    """
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal of a run: ``signum`` with one process; with several, the signal any
    process received (the highest number) or ``None``. A collective: every process calls it
    after the same step."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.int32(signum or 0))
    return int(np.max(gathered)) or None
