"""Fixtures for the load-generator tests: one fake OpenAI server per module."""

from __future__ import annotations

import pytest

from tests.unit.loadgen.fake_openai import FakeBehaviour, FakeServer


@pytest.fixture(scope="module")
def fake_server():
    behaviour = FakeBehaviour()
    server = FakeServer(behaviour)
    server.start()
    yield server, behaviour
    server.stop()


@pytest.fixture
def fake(fake_server):
    """(root url, behaviour) with the behaviour reset to defaults for each test."""
    server, behaviour = fake_server
    behaviour.reset()
    return server.url, behaviour
