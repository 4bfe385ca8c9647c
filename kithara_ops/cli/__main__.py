"""``python -m kithara_ops.cli``: the same as the ``kithara-ops`` command."""

from kithara_ops.cli import main

main()
