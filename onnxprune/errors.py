"""The one exception type that reaches users as a single line (CLI exit code 2)."""


class UserError(Exception):
    """Bad input the user can fix; the message says what to change."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
