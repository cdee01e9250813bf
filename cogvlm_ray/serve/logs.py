"""Where the package's log records go inside a Ray Serve replica.

Ray Serve configures only its own `ray.serve` logger (file + stderr handlers that stamp each
line with the replica and the request id) and does not propagate it; a plain
`logging.getLogger(__name__)` record of ours would reach no handler, so INFO lines (a refused
request, a client disconnect) were lost. `use_serve_handlers` gives the `cogvlm_ray` logger
those same handlers, once per process.
"""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "cogvlm_ray"
SERVE_LOGGER = "ray.serve"


def use_serve_handlers(level: int = logging.INFO) -> None:
    """Log `cogvlm_ray.*` records at `level` and above through Ray Serve's replica handlers."""
    package = logging.getLogger(PACKAGE_LOGGER)
    handlers = logging.getLogger(SERVE_LOGGER).handlers
    if not handlers:
        return
    for handler in handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False  # the handlers above already write the replica log
