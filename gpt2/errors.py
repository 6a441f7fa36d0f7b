"""User-facing errors and the one-line error handling shared by every command-line entry point.

Library code raises ``UserError`` (or ``ValueError``) with a message that says what is wrong and what to
do; only the entry points turn it into one line on stderr and an exit code. ``GPT2_TRACEBACK=1`` in the
environment shows the full traceback instead, for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2  # bad input or environment: fix the command and run it again
EXIT_DIVERGED = 3  # the run's loss or weights became non-finite: lower the learning rate or resume earlier


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = EXIT_USAGE


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point's ``main``: a ``UserError`` or ``ValueError`` becomes ``error: ...`` on stderr and its
    exit code (2, or 3 for a diverged run); Ctrl-C exits with 130."""
    try:
        main()
    except (UserError, ValueError) as e:
        if os.environ.get("GPT2_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
