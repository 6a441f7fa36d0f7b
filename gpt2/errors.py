"""User-facing errors and the one-line error handling shared by every command-line entry point.

Library code raises ``UserError`` with a message that says what is wrong and what to do; the entry points turn
it into one line on stderr and an exit code. Any other exception is a bug (in our code or below it) and keeps
its traceback. ``GPT2_TRACEBACK=1`` in the environment shows the traceback of a ``UserError`` too, for debugging.

Under ``torchrun`` every rank meets the same user error (the checks run on every rank, or rank 0's outcome is
broadcast to the others), so only rank 0 prints it: the job says it once, not once per process.
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
    """Run an entry point's ``main``: a ``UserError`` becomes ``error: ...`` on stderr (rank 0's only) and its exit
    code (2, or 3 for a diverged run); Ctrl-C exits with 130; anything else propagates with its traceback."""
    try:
        main()
    except UserError as e:
        if os.environ.get("GPT2_TRACEBACK") == "1":
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
