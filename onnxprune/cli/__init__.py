"""Command line: parses, calls the API, prints. No logic of its own.

app.py       the command group; errors to one line and an exit code
flags.py     the options, mapped onto onnxprune.options in one place
commands.py  prune (the default), inspect, validate, sweep
"""

from onnxprune.cli import commands  # noqa: F401  (registers the commands on the group)
from onnxprune.cli.app import main
from onnxprune.cli.flags import structured_settings

__all__ = ["main", "structured_settings"]
