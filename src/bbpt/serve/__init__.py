"""The black box as a real API: ``bbpt serve`` (FastAPI + uvicorn, keys and budgets in SQLite,
dynamic batching) and :class:`~bbpt.serve.client.RemoteBlackBox`, through which every method
runs unchanged (``bbpt run --remote URL``). Needs the ``serve`` extra (fastapi, uvicorn, httpx);
importing :mod:`bbpt` does not."""
