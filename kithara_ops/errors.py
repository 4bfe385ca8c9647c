"""Errors that mean "the user asked for something that cannot work".

The CLI prints these as one line and exits with code 2; the Python API raises them as
ordinary ``ValueError`` subclasses, so ``except ValueError`` keeps working for callers.
"""


class ConfigError(ValueError):
    """A bad value in a run's configuration or input (a path, a size, an optimizer spec).

    The message names the bad value and says how to fix it, in one line.
    """
