"""``kithara-ops launch``: a multi-process run on this machine, one process per rank.

Each process runs ``python -m kithara_ops.cli <command> ... --coordinator 127.0.0.1:PORT
--num-processes N --process-id I`` on its own virtual CPU devices, so a multi-process run
(and its checkpoints and MLflow run) can be tried out and tested without a cluster. On a
cluster, start one ``kithara-ops train`` per host with those three options instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Annotated

import typer

from kithara_ops.cli.app import app, user_errors
from kithara_ops.errors import ConfigError
from kithara_ops.interrupt import handling_signals
from kithara_ops.ports import free_port

COMMANDS = ("train", "resume")
"""The commands ``launch`` can run in several processes."""
RESERVED = ("--coordinator", "--num-processes", "--process-id")
"""Options ``launch`` sets itself."""
GRACE_SECONDS = 30.0
"""How long processes get to stop cleanly (and save) before they are killed."""
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def process_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of each process: ``devices_per_process`` virtual CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def process_commands(command: list[str], num_processes: int, port: int) -> list[list[str]]:
    """The command line of every process; all but process 0 run ``--quiet``."""
    if not command or command[0] not in COMMANDS:
        got = repr(command[0]) if command else "nothing"
        raise ConfigError(
            f"launch runs one of {', '.join(COMMANDS)} after '--', got {got}: e.g. "
            "kithara-ops launch --num-processes 2 -- train --steps 100."
        )
    for arg in command:
        if arg.split("=", 1)[0] in RESERVED:
            raise ConfigError(f"launch sets {arg.split('=', 1)[0]} itself: leave it out.")
    base = [sys.executable, "-m", "kithara_ops.cli", *command]
    base += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
    return [
        [*base, "--process-id", str(rank), *(["--quiet"] if rank else [])]
        for rank in range(num_processes)
    ]


def _stop(processes: list[subprocess.Popen], sig: int, grace: float = GRACE_SECONDS) -> None:
    """Send ``sig`` to the processes still running, wait up to ``grace`` seconds, then kill."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _show_log(rank: int, code: int, log: IO[bytes]) -> None:
    """Print the end of a failed process's captured output on stderr."""
    log.seek(0)
    tail = log.read().decode(errors="replace").splitlines()
    lines = [line for line in tail if not line.startswith("[Gloo]")][-30:]
    typer.echo(f"process {rank} exited with code {code}; its last output:", err=True)
    typer.echo("\n".join(lines), err=True)


class _Terminated(Exception):
    """SIGTERM reached ``launch``."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def run_processes(commands: list[list[str]], env: dict[str, str]) -> int:
    """Start every command, wait for all, and return the first non-zero exit code (or 0).

    Process 0 writes to this terminal; the others' output is kept and shown only if one of
    them fails. When a process fails the others are stopped. Ctrl-C or SIGTERM is passed
    on as SIGTERM (the processes save and stop) and gives 130 or 143.
    """
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(tempfile.TemporaryFile()) for _ in commands[1:]]
        return _supervise(commands, env, logs)


def _supervise(commands: list[list[str]], env: dict[str, str], logs: list[IO[bytes]]) -> int:
    """``run_processes`` with each process but 0 writing to its log file."""
    processes: list[subprocess.Popen] = []
    with handling_signals(_on_sigterm, (signal.SIGTERM,)):
        try:
            for rank, command in enumerate(commands):
                out = logs[rank - 1] if rank else None
                processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
            while True:
                codes = [process.poll() for process in processes]
                failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    rank, code = failed[0]
                    _stop(processes, signal.SIGTERM, grace=10.0)
                    if rank:
                        _show_log(rank, code, logs[rank - 1])
                    return code if code > 0 else 128 - code  # killed by signal N: 128 + N
                if all(code == 0 for code in codes):
                    return 0
                time.sleep(0.2)
        except KeyboardInterrupt:
            _stop(processes, signal.SIGTERM)
            return 130
        except _Terminated:
            _stop(processes, signal.SIGTERM)
            return 143
        finally:
            _stop(processes, signal.SIGKILL)  # only if something above went wrong


@app.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    epilog=(
        "Examples:\n\n"
        "  kithara-ops launch --num-processes 2 --devices-per-process 2 -- train --sharding fsdp\n\n"
        "  kithara-ops launch --num-processes 2 -- train --resume --checkpoint-dir runs/a"
    ),
)
@user_errors
def launch(
    command: Annotated[
        list[str],
        typer.Argument(
            help="train (or resume) and its options, after '--'.",
            metavar="COMMAND",
            show_default=False,
        ),
    ],
    num_processes: Annotated[
        int, typer.Option("--num-processes", "-n", help="Processes to start.", min=1)
    ] = 2,
    devices_per_process: Annotated[
        int, typer.Option(help="Virtual CPU devices of each process.", min=1)
    ] = 1,
) -> None:
    """Run train (or resume) as a multi-process run of local processes on CPU.

    The processes join through a coordinator on 127.0.0.1; together they train one run,
    with one MLflow run and one checkpoint directory. Process 0's output is shown; the
    exit code is the first non-zero one of any process.
    """
    commands = process_commands(list(command), num_processes, free_port())
    env = process_env(devices_per_process)
    typer.echo(
        f"launch: {num_processes} processes x {devices_per_process} CPU devices: "
        f"{shlex.join(command)}",
        err=True,
    )
    code = run_processes(commands, env)
    if code:
        raise typer.Exit(code)
