"""Subcommands of ``npformer`` beyond pretrain/generate.

Every module here defines ``add_parser(subparsers)``, which adds its subcommand and sets
``run=`` to the function that executes it; ``npformer.cli`` discovers them all. A command
raises ValueError/OSError subclasses for expected failures: the CLI prints them as one line.
"""
