"""User-facing errors.

`UserError` is raised at the boundary for bad input (a value the user gave that
we cannot use). The CLI prints its message as one line and exits with code 2;
every message names the bad value and says what to do. It is not a
`ValueError`, so an `except ValueError` meant for a parser or a library does
not swallow it. `find_user_error` digs one out of the wrappers Ray puts around
an exception raised inside a task, an actor or a Ray Train worker, so a mistake
found there reads the same.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the value and the fix."""


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The exceptions `exc` explicitly wraps: `raise ... from` (`__cause__`, as Ray Data's UserCodeException
    does) and Ray's own fields (RayTaskError's `cause`, Ray Train's worker and controller failures).

    Never `__context__`: an exception raised while another was being handled is a new error (a bug in an
    `except UserError` block must keep its traceback), not a wrapper of the first."""
    out = [exc.__cause__]
    for name in ("cause", "controller_failure", "error"):
        out.append(getattr(exc, name, None))
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out.extend(failures.values())
    return [e for e in out if isinstance(e, BaseException)]


def find_user_error(exc: BaseException) -> UserError | None:
    """The `UserError` that `exc` is or wraps, if any (Ray's wrappers subclass it too, so skip those)."""
    from_ray = ()
    try:
        from ray.exceptions import RayError

        from_ray = (RayError,)
    except ImportError:
        pass
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError) and not isinstance(e, from_ray):
            return e
        stack.extend(_wrapped(e))
    return None
