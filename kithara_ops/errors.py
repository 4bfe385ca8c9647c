"""The errors a user is told about in one line, and how to make that line.

``ConfigError`` means "the user asked for something that cannot work": the CLI exits with
code 2; the Python API raises it as an ordinary ``ValueError`` subclass. ``Diverged`` means
the run itself went wrong (its loss stopped being finite), ``CheckpointWriteError`` that a
checkpoint could not be written: the CLI exits with code 1 for both.
"""


class ConfigError(ValueError):
    """A bad value in a run's configuration or input (a path, a size, an optimizer spec).

    The message names the bad value and says how to fix it, in one line.
    """


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """The first non-empty line of ``str(err)``, stripped, for one-line messages.

    Library errors often carry a traceback or a dump of the request after their first line;
    a one-line message keeps only what says what went wrong (a preface line about how the
    error surfaced, ``_PREFACES``, is passed over).

    Args:
      err: the exception to describe.
      limit: the most characters returned (``None``: the whole line).

    Returns:
      That line cut to ``limit`` characters, or the exception's type name when its message
      is empty (``str(KeyError())`` says nothing).
    """
    for line in str(err).splitlines():
        if line.strip() and not line.strip().startswith(_PREFACES):
            return line.strip()[:limit]
    return type(err).__name__


_PREFACES = ("(raised as a result of",)
"""First lines that say how an error surfaced, not what failed: SQLAlchemy puts "(raised as a
result of Query-invoked autoflush; ...)" before the database's own error (a full disk)."""


class Diverged(RuntimeError):
    """Raised by ``Trainer.train()`` when the run stopped on non-finite values.

    Attributes:
      step: the logging step at which it was noticed.
      reason: what was seen, e.g. ``"loss nan"``.
    """

    def __init__(self, step: int, reason: str, last_good: int | None, directory: object = None):
        where = (
            f"the last good checkpoint is step {last_good} in {str(directory)!r}"
            if last_good is not None
            else "no checkpoint was saved"
        )
        super().__init__(
            f"training diverged at step {step} ({reason}); {where}: lower the learning rate "
            "or clip gradients, then resume, or pass --on-nonfinite skip."
        )
        self.step, self.reason = step, reason


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a directory removed or read-only).

    The message names the directory and the cause in one line; the checkpoints saved before
    are kept, and the run can resume from the last complete one. The CLI exits with code 1.
    """


class StoreFailed(RuntimeError):
    """A store the run reports to can no longer take it (an MLflow store that is full or
    read-only), so the run stopped after the current step, whose state was checkpointed.

    The message names the store and the cause in one line; the CLI exits with code 1.
    """
