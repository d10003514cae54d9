"""The subcommands of ``slim``: one module each, with ``register(subparsers)`` and ``run(args) -> int``."""
