"""TCP ports on this machine: for the coordinator of ``launch`` and for local MLflow servers.

A module of its own because a port is not a tracking matter: ``launch`` needs one for the
JAX coordinator, ``ui`` and the tests' servers need them for MLflow and PostgreSQL.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago.

    The socket is closed before returning, so another process could take the port first;
    callers that start a server on it report that as the server failing to start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP server could listen on ``host``:``port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
