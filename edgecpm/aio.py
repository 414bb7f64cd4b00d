"""asyncio over the blocking generation loop: one worker thread per stream, events handed to the loop.

The model runs in native code that releases the GIL, so a worker thread keeps the event loop free; the
thread waits its turn in the engine's queue like any other caller. When the consumer stops early (break,
aclose, its task cancelled, an HTTP client gone) the generation is cancelled and stops within one decode
step, and the thread closes the stream itself, since a generator cannot be closed while another thread
is inside it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from edgecpm.control import CancelToken

T = TypeVar("T")
_END = object()


async def iterate_in_thread(start: Callable[[], Iterator[T]], cancel: CancelToken) -> AsyncIterator[T]:
    """Items of the iterator `start()` builds (in the worker thread: building may block too). That
    iterator must stop soon once `cancel` fires, which happens when the consumer stops early."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()

    def hand_over(item: object, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.cancel()

    def work() -> None:
        try:
            iterator = start()
            try:
                # Run to the end even after a cancel: the iterator honours `cancel` itself (ending within
                # one step), and its last item (the result, with finish_reason "cancelled") still counts.
                for item in iterator:
                    hand_over(item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(_END, exc)
        else:
            hand_over(_END)

    threading.Thread(target=work, name="edgecpm-astream", daemon=True).start()
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        cancel.cancel()  # a no-op after a normal end; otherwise it stops the worker within one step
