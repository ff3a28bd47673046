"""Shared test hygiene."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_detkit_logger() -> Iterator[None]:
    """Tools' ``setup_logging`` stops the ``detkit`` logger from propagating (the CLI prints through
    its own handlers); restore it after each test so later tests' ``caplog`` sees the records."""
    log = logging.getLogger("detkit")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    for h in list(log.handlers):
        if h not in handlers:
            log.removeHandler(h)
            h.close()
    log.propagate, log.level = propagate, level


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread (the test machine is shared); restored afterwards.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
