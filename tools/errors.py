"""The one error type of the ``tread-fx`` commands.

A command raises :class:`UsageError` for input it cannot use (a bad ``--routes``, an ``--out``
that names a file, an unknown model); ``tread_fx.tools.cli.main`` prints it as
``tread-fx <command>: error: <message>`` with no traceback and exits with status 2, the way
argparse reports a bad flag.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""
