"""`twin serve`: settings -> the twin loaded -> uvicorn on host:port until stopped.

Data flow: configs/serve.yaml (a plain mapping from the `twin` CLI) -> `load_settings`
(refuses an unauthenticated non-loopback service) -> torch threads set -> `create_app` -> the
loaded heap frozen (serving/heap.py) -> uvicorn, with uvloop and httptools when installed.
SIGINT / SIGTERM stop it gracefully: not-ready first, then requests in flight finish (up to
`graceful_shutdown_s`).
"""

import logging
from collections.abc import Mapping

import torch

from serving.settings import load_settings

GRACEFUL_SHUTDOWN_S = 10


def _fastest(module: str, name: str, fallback: str) -> str:
    try:
        __import__(module)
    except ImportError:
        return fallback
    return name


def run_serve(config: Mapping) -> None:
    """Serve until stopped.

    Args:
        config: the keys of configs/serve.yaml.

    Raises:
        SettingsError: invalid or unsafe settings.
        TwinFileError: the model cannot be loaded.
    """
    import uvicorn
    from uvicorn.config import LOG_LEVELS

    from serving.app import create_app
    from serving.heap import freeze_long_lived

    settings = load_settings(config)
    # uvicorn's levels, "trace" (5) among them, which logging learns only inside uvicorn.run
    level = LOG_LEVELS[settings.log_level]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Under `twin serve` Hydra has set up logging already and basicConfig does nothing: the
    # service's own logger takes the level itself (Hydra's handlers, its cli.log, stay).
    logging.getLogger("serving").setLevel(level)
    # The twin's time is per-op overhead (benchmarks/online_latency.md): more intra-op threads
    # only take cores from the HTTP side.
    torch.set_num_threads(settings.num_threads)
    app = create_app(settings)
    # torch, the web stack and the twin are loaded: keep them out of full GC passes (heap.py)
    freeze_long_lived()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # /metrics counts every request; a log line each costs ~10 % here
        loop=_fastest("uvloop", "uvloop", "asyncio"),
        http=_fastest("httptools", "httptools", "h11"),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
