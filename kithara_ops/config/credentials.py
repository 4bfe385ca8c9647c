"""Credentials written into a tracking URI (``http://user:password@host``) are never kept.

A run's tracking URI goes into its config, its checkpoints' records, MLflow's params and
artifacts, spool files and messages; MLflow itself prints its server's URI when a run ends.
So the credentials of an ``http``/``https`` server are taken out where the URI enters a
run (``take_credentials``) and handed to MLflow the way it reads them anyway, as
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` in this process's environment
(inherited by the processes it starts); only the URI without them travels on. ``masked``
writes any URI for messages. A database URI (``postgresql://user:pw@host/db``) keeps its
credentials, which its driver needs, and is shown masked.
"""

from __future__ import annotations

import os
import urllib.parse

USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


def _split(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without userinfo, username, password)``, the latter two decoded or ``None``."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, colon, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return (
        bare,
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if colon else None,
    )


def masked(uri: str | None) -> str | None:
    """``uri`` with its password shown as ``***`` (``http://alice:***@host``), for messages."""
    if not uri or "@" not in uri:
        return uri
    bare, user, password = _split(uri)
    if user is None and password is None:
        return uri
    parts = urllib.parse.urlsplit(bare)
    shown = f"{urllib.parse.quote(user or '')}:***@" if password is not None else "***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=shown + parts.netloc))


def take_credentials(uri: str | None) -> str | None:
    """``uri`` without ``user:password@``, which go to MLflow's credential variables instead.

    A URI without credentials, or of another scheme than ``http``/``https``, is returned as
    it is and the environment is left alone.
    """
    if not uri or "@" not in uri or urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return uri
    bare, user, password = _split(uri)
    if user is None and password is None:
        return uri
    if user is not None:
        os.environ[USERNAME_ENV] = user
    if password is not None:
        os.environ[PASSWORD_ENV] = password
    return bare
