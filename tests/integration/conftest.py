"""Integration suites use the session-wide `serve_app` fixture (tests/conftest.py).

The names below are re-exported for the suites that import them from here.
"""

from tests.serve_app import (  # noqa: F401
    API_KEY,
    APP_NAME,
    MAX_NUM_SEQS,
    MAX_QUEUED_REQUESTS,
    ServeApp,
    free_port,
    integration_app_args,
)
