"""Command line: parses, calls the API, prints. No logic of its own.

app.py       the command group; errors to one line and an exit code
flags.py     the options, mapped onto onnxprune.options in one place
commands.py  prune (the default), inspect
compare.py   validate, sweep (and the sweep that picks a sparsity within a budget), sensitivity

Nothing heavy (ONNX, ONNX Runtime, numpy) is imported before a command runs: `--help` and
argument errors stay fast.
"""

from onnxprune.cli import commands, compare  # noqa: F401  (register the commands on the group)
from onnxprune.cli.app import main
from onnxprune.cli.flags import structured_settings

__all__ = ["main", "structured_settings"]
