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
