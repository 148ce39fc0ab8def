"""The subcommands of ``npformer``, one module each, in the order ``npformer --help`` lists them.

Every module here defines ``add_parser(subparsers)``, which adds its subcommand and sets
``run=`` to the function that executes it. A command raises ValueError/OSError subclasses for
expected failures: the CLI (npformer/cli.py) prints them as one line.
"""

import argparse

COMMANDS = ("pretrain", "generate", "seq2seq", "translate", "finetune")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where X is None (the help then says
    what None stands for) or a store_true flag's False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
