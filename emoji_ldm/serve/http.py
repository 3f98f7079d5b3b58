"""The HTTP plumbing of the service: one JSON error shape, the body-size limit and the API-key check.

`new_api(keyring)` builds the FastAPI app with all three in place; the routes are added by the
Ingress (serve/app.py) and the jobs routes (serve/jobs/routes.py). Errors are
`{"error": message, "field": name or null}` whatever raised them: an `ApiError`, a validation
error, Starlette's own 404/405, an oversize body, a refused key or a bug (a JSON 500).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from emoji_ldm import __version__
from emoji_ldm.serve.errors import ApiError

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 256 * 1024  # 256 items of 500 characters fit; anything bigger is refused with 413


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None,
                   extra: dict | None = None):
    return JSONResponse({**(extra or {}), "error": message, "field": field}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.field, exc.headers, exc.extra)


async def _validation_error(request: Request, exc: RequestValidationError):
    """422 naming the first bad field (all of them under `errors`); malformed JSON is a 400."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "required"
    details = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or None,
                "error": e["msg"].removeprefix("Value error, ")} for e in errors]
    return JSONResponse({"error": f"{field}: {message}" if field else message, "field": field, "errors": details},
                        status_code=422)


async def _internal_error(request: Request, exc: Exception):
    """Anything unexpected: its traceback in the replica's log, a JSON 500 to the caller (no internals)."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}): the server's log has the details")


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Starlette's own errors (404, 405) in the same JSON shape."""
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on to `_http_error` instead of a generic 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is larger than {max_bytes} bytes: send fewer or shorter prompts, "
                              "or split the set")


class BodyLimit:
    """413 with our JSON for bodies over `max_bytes`, by Content-Length or while streaming.

    (FastAPI's own `max_body_size` answers a declared oversize body in plain text, which would
    break the API's one error shape.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, _TooLarge(self.max_bytes).detail)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


PUBLIC_ROUTES = frozenset({"", "/", "/healthz"})  # GET/HEAD only, matched exactly on the path below root_path
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def route_path(scope) -> str:
    """The request's path below the app's mount point (`root_path`: Ray Serve's `route_prefix`, a proxy's
    prefix). Starlette keeps the full path in `scope["path"]`; an ASGI server may also give it already
    stripped."""
    path, root = scope.get("path", ""), (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):]
    return path


def is_public(scope) -> bool:
    """The one rule: a request is open only if it is a GET or HEAD of exactly one of PUBLIC_ROUTES below
    root_path. Everything else needs a key: every method, every other path, whatever the prefix, and any
    spelling that is not exactly a public path (a double slash, a trailing slash, an encoded character that
    decodes to something else) is simply not public."""
    return scope.get("method") in ("GET", "HEAD") and route_path(scope) in PUBLIC_ROUTES


_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]*)(:[0-9]{1,5})?")


def _host_of(headers: dict) -> str:
    """The Host header's name without its port ('' for one that is not a plain host[:port])."""
    match = _HOST.fullmatch(headers.get(b"host", b"").decode("latin-1").strip().lower())
    return match.group(1) if match else ""


class KeyCheck:
    """With a keyring, every request needs a valid key within its rate, whatever its path and the app's
    root_path, except a GET/HEAD of a public route (`is_public`: the page and /healthz, which do no work);
    checked before the body is read and before any model replica is asked: 401 or 429 JSON otherwise. The key
    goes to the handler as `request.state.api_key`.

    Without a keyring (None) and with `local_only`, only requests whose Host is localhost, 127.0.0.1 or [::1]
    pass (403 otherwise): a page on another site cannot reach the local server through DNS rebinding. Without
    either, every request passes (the operator's `insecure`)."""

    def __init__(self, app, keyring=None, local_only: bool = False):
        self.app, self.keyring, self.local_only = app, keyring, local_only

    async def __call__(self, scope, receive, send):
        from emoji_ldm.serve.keys import AuthError

        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.keyring is None:
            if self.local_only and _host_of(headers) not in LOCAL_HOSTS:
                if scope["type"] != "http":
                    return  # a websocket we do not accept: closed
                return await error_response(403, "this server runs without API keys and answers only requests "
                                                 "for localhost (Host header)")(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and is_public(scope):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return  # no websocket route needs one; refused without reading anything
        try:
            key = self.keyring.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            await self.keyring.meter(key)
        except AuthError as e:
            return await error_response(e.status, e.message, headers=e.headers)(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every answer: a PNG or a zip is never read as a page."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sent(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, sent)


def page_headers(html: str) -> dict:
    """The web page holds a key in memory: a Content-Security-Policy that runs only its own inline script (by its
    hash), loads nothing from elsewhere, talks only to this origin and is framed by no one."""
    import base64
    import hashlib

    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                      for s in scripts)
    script_src = hashes or "'none'"
    policy = (f"default-src 'none'; script-src {script_src}; style-src 'unsafe-inline'; "
              "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}


def new_api(keyring=None, local_only: bool = False) -> FastAPI:
    """A FastAPI app with the error handlers, the body limit and the key check (`KeyCheck`); no routes.

    With keys there are no /docs or /redoc pages (they load JavaScript from a CDN into a page that would hold
    a key), and /openapi.json needs a key like every route that is not public; without keys /docs is served."""
    api = FastAPI(
        docs_url=None if keyring is not None else "/docs",
        redoc_url=None,
        title="emoji-ldm",
        version=__version__,
        description="Generate emoji and themed emoji sets from a trained emoji-ldm model. "
                    "Errors are JSON: `{\"error\": message, \"field\": name or null}`.",
    )
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(Exception, _internal_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    # added last, so it runs first: no body is read without a key
    api.add_middleware(KeyCheck, keyring=keyring, local_only=local_only)
    api.add_middleware(NoSniff)  # around everything, the key check's refusals too
    return api
