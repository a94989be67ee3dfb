"""Dynamic batching: concurrent queries merged into one forward, as Triton and Ray Serve do.

A batch holds at most ``max_batch`` queries (1: no batching, each query alone) and at most
``max_rows`` text sequences (candidates x classes, summed; a query over it runs alone): on a
CPU the text tower's cost per sequence rises by a third past about a thousand sequences,
so bigger batches only lose. It holds every query
that arrived while the previous batch ran, and, with ``max_wait`` > 0, those arriving
within that many seconds after the first (0, the default: a lone query never waits, and
under load batches form from the queries that queue up during a forward). The batch runs
in a worker thread (torch releases the GIL), so the event loop keeps accepting requests
meanwhile; its queries share one text-tower forward (:func:`bbpt.models.blackbox.query_many`),
and each gets logits equal to its own unbatched answer up to float rounding.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..models.blackbox import query_many


@dataclass
class _Job:
    item: tuple  # (box, prompt, images, visual)
    rows: int  # text sequences it needs: candidates x classes
    future: asyncio.Future = field(default=None)


class Batcher:
    def __init__(self, max_batch: int = 32, max_wait: float = 0.0, max_rows: int = 1024):
        self.max_batch, self.max_wait, self.max_rows = max(1, max_batch), max_wait, max(1, max_rows)
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: _Job | None = None  # taken from the queue but over the last batch's rows: first of the next
        self._task: asyncio.Task | None = None
        self.batches = 0  # forwards run, and queries in them: the batching actually achieved
        self.queries = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, item: tuple, rows: int = 1):
        """Logits (P, B, C) of one query, answered in a batch with whatever else is waiting."""
        job = _Job(item, rows, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            first, self._held = self._held or await self._queue.get(), None
            jobs, rows = [first], first.rows
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if rows + job.rows > self.max_rows:
                    self._held = job
                    break
                jobs.append(job)
                rows += job.rows
            try:
                results = await asyncio.to_thread(self._forward, [j.item for j in jobs])
            except Exception as e:  # noqa: BLE001 -- delivered to the requests, which turn it into replies
                results = [e] * len(jobs)
            self.batches += 1
            self.queries += len(jobs)
            for j, r in zip(jobs, results):
                if j.future.done():
                    continue
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)

    @staticmethod
    def _forward(items: list[tuple]) -> list:
        """All items in one forward; if that fails (one bad item), each alone, so one
        query's error never becomes another's."""
        try:
            return query_many(items)
        except Exception:  # noqa: BLE001
            if len(items) == 1:
                raise
        out = []
        for it in items:
            try:
                out.append(query_many([it])[0])
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out
