"""User-facing errors.

`UserError` is raised at the boundary for bad input (a value the user gave that
we cannot use). The CLI prints its message as one line and exits with code 2;
every message names the bad value and says what to do. `find_user_error` digs
one out of the wrappers Ray puts around an exception raised inside a task, an
actor or a Ray Train worker, so a mistake found there reads the same.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the value and the fix."""


def _linked(exc: BaseException) -> list[BaseException]:
    """The exceptions `exc` wraps: Python's chain and Ray's own fields (`cause`, Train's worker failures)."""
    out = [exc.__cause__, exc.__context__]
    for name in ("cause", "controller_failure", "error"):
        value = getattr(exc, name, None)
        if isinstance(value, BaseException):
            out.append(value)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out.extend(failures.values())
    return [e for e in out if isinstance(e, BaseException)]


def find_user_error(exc: BaseException) -> UserError | None:
    """The `UserError` at the root of `exc`, if any (Ray's wrappers subclass it too, so skip those)."""
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
        stack.extend(_linked(e))
    return None
