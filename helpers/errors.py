"""The user-error type, shared by models.py and the plumbing (helpers/utils.py), which imports no model code.

Usage:
    from helpers.errors import UserError
    raise UserError("--fold 11: DTD has folds 1-10. Pass --fold 1..10.")
"""
from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the user's command, data or files; the message says what and how to fix it.

    Entry scripts let it propagate to run_main, which prints one `error: ...` line and exits 2
    (a subclass may set another exit_code). Any other exception is a bug and keeps its traceback.
    """

    exit_code = EXIT_USAGE
