"""Fixtures for the inbound/DNS/accel kernel tests: one compiled datapath per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def datapath():
    from tests.podenv import require_kernel
    require_kernel()
    from tests.datapath.harness import Datapath
    dp = Datapath()
    yield dp
    dp.close()
