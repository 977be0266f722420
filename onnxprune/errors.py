"""The one exception type that reaches users as a single line (CLI exit code 2)."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input the user can fix; the message says what to change."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# OSErrors a user fixes by choosing another path or freeing space, with what to do.
_FIXES = {
    errno.ENOSPC: "free space, or write elsewhere",
    errno.EDQUOT: "free space within your quota, or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check the permissions, or write elsewhere",
    errno.EPERM: "check the permissions, or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EEXIST: "a file is in the way of a folder the path needs; choose another path",
    errno.ENOENT: "check the path",
}


def os_user_error(exc: OSError, path=None) -> UserError | None:
    """The UserError for an OSError the user can fix (full disk, permissions, bad path), else None."""
    fix = _FIXES.get(exc.errno)
    if fix is None:
        return None
    where = exc.filename or path
    reason = exc.strerror or first_line(exc)
    return UserError(f"{where}: {reason}; {fix}" if where else f"{reason}; {fix}")


class CheckFailed(Exception):
    """A check the user asked for did not pass (`verify`, sparsity kept by quantization): CLI exit code 3."""

    exit_code = 3
