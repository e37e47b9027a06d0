"""Drives a synchronous engine from asyncio: every engine call runs on one dedicated thread.

Engines are not thread-safe and their steps block for milliseconds to seconds. Serializing all
calls (admission, abort, step) on one thread keeps the engine single-threaded while the replica's
event loop stays free to accept requests and stream tokens.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
