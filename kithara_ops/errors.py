"""Errors that mean "the user asked for something that cannot work".

The CLI prints these as one line and exits with code 2; the Python API raises them as
ordinary ``ValueError`` subclasses, so ``except ValueError`` keeps working for callers.
"""


class ConfigError(ValueError):
    """A bad value in a run's configuration or input (a path, a size, an optimizer spec).

    The message names the bad value and says how to fix it, in one line.
    """


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """The first non-empty line of ``str(err)``, stripped, for one-line messages.

    Library errors often carry a traceback or a dump of the request after their first line;
    a one-line message keeps only what says what went wrong.

    Args:
      err: the exception to describe.
      limit: the most characters returned (``None``: the whole line).

    Returns:
      That line cut to ``limit`` characters, or the exception's type name when its message
      is empty (``str(KeyError())`` says nothing).
    """
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(err).__name__
