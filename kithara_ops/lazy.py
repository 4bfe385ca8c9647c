"""Public names loaded on first use, for packages that stay light to import."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_names(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` that import each name's module on first use.

    Args:
      package: the module's name, for the error a missing name raises.
      homes: each public name and the module that defines it.
      namespace: the module's ``globals()``, where a loaded name is cached.
      public: the module's ``__all__``.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            # AttributeError (not ImportError) lets ``from package import submodule`` fall back
            # to importing the submodule.
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *public})

    return __getattr__, __dir__
