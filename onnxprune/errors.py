"""The one exception type that reaches users as a single line (CLI exit code 2)."""


class UserError(Exception):
    """Bad input the user can fix; the message says what to change."""
