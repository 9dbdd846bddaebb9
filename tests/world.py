"""The network test world for pytest: :mod:`corral.world` plus the session fixture.

``from world import world  # noqa: F401`` in ``tests/conftest.py`` makes the
session-scoped ``world`` fixture available (skipped without user namespaces unless
CORRAL_MUST_WORK=1, which turns that into a failure).  Tests import the world's
addresses from here (``from world import HTTP_V4``).
"""

import os

import pytest

from corral.world import *  # noqa: F403  (addresses, ports, World)
from corral.world import World, WorldUnavailable
from corral.world import __all__ as _world_all

__all__ = [*_world_all, "world"]


@pytest.fixture(scope="session")
def world():
    """Session-scoped World; skipped (or failed under CORRAL_MUST_WORK=1) if unavailable."""
    try:
        w = World.start()
    except WorldUnavailable as exc:
        if os.environ.get("CORRAL_MUST_WORK"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield w
    finally:
        w.close()
