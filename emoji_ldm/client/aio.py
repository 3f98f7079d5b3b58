"""`AsyncClient`: the same calls as `Client`, awaitable. Each call runs the sync client's in a worker thread
(`asyncio.to_thread`), so both share one implementation of the retries, the stream and the polling, and the
client needs no async HTTP library: emoji jobs take seconds to minutes, a thread per call in flight is cheap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from emoji_ldm.client.events import Event
from emoji_ldm.client.sync import Client, Generated, Job

_END = object()


class AsyncJob:
    """`Job`'s calls, awaitable: `await (await client.submit(spec)).wait()`."""

    def __init__(self, client: AsyncClient, job: Job):
        self.client, self.job = client, job

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, state={self.state!r})"

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def status(self) -> dict:
        return self.job.status

    async def refresh(self) -> AsyncJob:
        await asyncio.to_thread(self.job.refresh)
        return self

    def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        return self.client.subscribe(self, timeout=timeout)

    async def wait(self, timeout: float | None = None) -> AsyncJob:
        await asyncio.to_thread(self.job.wait, timeout)
        return self

    async def result(self) -> bytes:
        return await asyncio.to_thread(self.job.result)

    async def save(self, path: str | os.PathLike) -> Path:
        return await asyncio.to_thread(self.job.save, path)

    async def cancel(self) -> AsyncJob:
        await asyncio.to_thread(self.job.cancel)
        return self


class AsyncClient:
    """`Client(base_url, api_key, timeout, retries, ...)` with awaitable calls and an async `subscribe`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 4,
                 **settings):
        self.sync = Client(base_url, api_key, timeout, retries, **settings)

    async def submit(self, spec: dict, idempotency_key: str | None = None,
                     cancel_after: str | float | None = None) -> AsyncJob:
        return AsyncJob(self, await asyncio.to_thread(self.sync.submit, spec, idempotency_key, cancel_after))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await asyncio.to_thread(self.sync.job, job_id))

    async def status(self, job: AsyncJob | str) -> dict:
        return await asyncio.to_thread(self.sync.status, _sync(job))

    async def cancel(self, job: AsyncJob | str) -> AsyncJob:
        done = await asyncio.to_thread(self.sync.cancel, _sync(job))
        return job if isinstance(job, AsyncJob) else AsyncJob(self, done)

    async def subscribe(self, job: AsyncJob | str | dict, timeout: float | None = None) -> AsyncIterator[Event]:
        """`Client.subscribe`'s events, each awaited from a worker thread."""
        if isinstance(job, dict):
            job = await self.submit(job)
        events = self.sync.subscribe(_sync(job), timeout=timeout)
        try:
            while (event := await asyncio.to_thread(next, events, _END)) is not _END:
                yield event
        finally:
            try:
                events.close()  # its stream's connection back to the pool
            except ValueError:
                pass  # still inside next() in its thread (this task was cancelled): it ends with that call

    async def result(self, job: AsyncJob | str, path: str | os.PathLike | None = None) -> bytes | Path:
        return await asyncio.to_thread(self.sync.result, _sync(job), path)

    async def generate(self, prompt: str, **fields) -> Generated:
        return await asyncio.to_thread(self.sync.generate, prompt, **fields)

    async def verify(self, file: str | os.PathLike | bytes, remote: bool | None = None) -> dict:
        return await asyncio.to_thread(self.sync.verify, file, remote)


def _sync(job: AsyncJob | str) -> Job | str:
    return job.job if isinstance(job, AsyncJob) else job
