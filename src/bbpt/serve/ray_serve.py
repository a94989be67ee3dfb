"""``bbpt serve --ray --replicas N``: the same FastAPI app as a Ray Serve deployment.

Each replica is a Ray actor that builds the app itself (:func:`bbpt.serve.app.create_app`,
called on the replica, so the model is loaded there and never pickled), runs its lifespan
(model, store, batcher) and batches the queries routed to it. Ray Serve's proxy binds
``host:port`` and spreads requests over the replicas.

The replicas share one SQLite file for keys, budgets, usage and stored replies. A charge
is one ``BEGIN IMMEDIATE`` transaction, so budgets hold across replicas exactly as across
threads, and an Idempotency-Key retry that lands on another replica is answered from the
stored reply. SQLite needs the replicas on one machine (one node, or a file system with
working locks); that is what ``--replicas`` on a single host gives.

Ray is optional: ``pip install 'ray[serve]'``. ``ray.init()`` joins the cluster named by
``RAY_ADDRESS`` when it is set, else starts a local instance that stops with the server.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path

from ..errors import BadInput
from .app import ServeConfig, create_app

logger = logging.getLogger(__name__)
APP_NAME = "bbpt"


def _absolute(cfg: ServeConfig) -> ServeConfig:
    """Paths as the replicas will see them (Ray workers need not share the driver's cwd)."""
    pre, model = cfg.pretrained, cfg.model
    if pre and Path(pre).expanduser().exists():
        pre = str(Path(pre).expanduser().resolve())
    if model.startswith("hf:") and Path(model[3:]).expanduser().is_dir():  # a folder, not a hub id
        model = "hf:" + str(Path(model[3:]).expanduser().resolve())
    return dataclasses.replace(cfg, db=str(Path(cfg.db).expanduser().resolve()), pretrained=pre, model=model)


def deployment(cfg: ServeConfig, replicas: int, cpus_per_replica: float = 1.0):
    """The Ray Serve application: ``replicas`` copies of the app, each building its own."""
    from ray import serve

    cfg = _absolute(cfg)

    def build():  # runs on each replica
        return create_app(cfg)

    ingress = serve.deployment(
        serve.ingress(build)(), name=APP_NAME, num_replicas=replicas,
        # enough requests in flight per replica for its batcher to fill batches
        max_ongoing_requests=max(8, 4 * cfg.max_batch),
        ray_actor_options={"num_cpus": cpus_per_replica})
    return ingress.bind()


def serve_with_ray(cfg: ServeConfig, host: str, port: int, replicas: int, cpus_per_replica: float = 1.0) -> None:
    """Start (or join) Ray, deploy, and serve until SIGINT / SIGTERM; then shut Serve down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BadInput("--ray needs Ray Serve: pip install 'ray[serve]'") from None
    started_here = not ray.is_initialized()
    # Serve kills a proxy that is not ready within 5 s and gives up after 60 s in all; on a
    # busy small machine the proxy's start alone can take longer (measured: 2 cores, 4 busy
    # processes). A longer ready check reaches the processes of a Ray instance started here.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
    stop = threading.Event()

    def on_signal(*_):  # the first signal stops Serve cleanly; a second one (say, during a stuck start) at once
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (aborting) handlers
        signal.signal(s, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(cfg, replicas, cpus_per_replica), name=APP_NAME, route_prefix="/")
        logger.info("bbpt serve: Ray Serve ready, %d replica(s) on http://%s:%s/v1", replicas, host, port)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()
