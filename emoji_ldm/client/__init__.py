"""A Python client of the emoji-ldm HTTP API (`emoji-ldm serve`), for a program that talks to a remote service:
it imports nothing from serve/ and needs only urllib3 (c2pa-python, when installed, to verify files locally).

    from emoji_ldm.client import Client
    job = Client("http://127.0.0.1:8000").submit({"theme": "blob", "items": ["happy", "sad", "thinking"]})
    job.wait().save("set.zip")

`Client.submit` / `subscribe` / `result` / `cancel` / `verify` / `generate`, and `AsyncClient` with the same
calls awaitable. The key comes from `api_key` or $EMOJI_LDM_API_KEY. docs/client.md is the guide."""

from emoji_ldm.client.aio import AsyncClient, AsyncJob
from emoji_ldm.client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectError,
    EmojiLdmError,
    JobCancelled,
    JobFailed,
    NotFoundError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from emoji_ldm.client.events import Event
from emoji_ldm.client.sync import Client, Generated, Job
from emoji_ldm.client.transport import Retry, Settings

__all__ = ["AsyncClient", "AsyncJob", "AuthenticationError", "BadRequestError", "Client", "ConflictError",
           "ConnectError", "EmojiLdmError", "Event", "Generated", "Job", "JobCancelled", "JobFailed",
           "NotFoundError", "RateLimitError", "Retry", "ServerError", "Settings", "ValidationError"]
