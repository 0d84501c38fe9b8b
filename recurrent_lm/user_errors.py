"""How every command line reports a user error: one ``error: ...`` line on
stderr and exit status 2, no traceback.

    @reports_user_errors
    def main(argv=None) -> int: ...

A user error is an exception of `USER_ERRORS`: bad values and files (the
package raises ValueError, or a subclass, with a message naming the problem
and the fix), missing or existing paths. Anything else is a bug and keeps its
traceback. argparse reports bad flags itself (usage line, status 2).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
EXIT_USER_ERROR = 2


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, with a `USER_ERRORS` exception printed as ``error: MESSAGE`` on
    stderr and returned as `EXIT_USER_ERROR`."""

    @functools.wraps(main)
    def main_reporting_user_errors(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR

    return main_reporting_user_errors
