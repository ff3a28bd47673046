"""Shared test hygiene."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _detkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``$DETKIT_HOME`` (the ImageFolder scans, weights by name) is a temporary folder, not the user's
    ``~/.cache/detkit``; subprocesses inherit it."""
    old = os.environ.get("DETKIT_HOME")
    os.environ["DETKIT_HOME"] = str(tmp_path_factory.mktemp("detkit_home"))
    yield
    if old is None:
        os.environ.pop("DETKIT_HOME", None)
    else:
        os.environ["DETKIT_HOME"] = old


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


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread (the test machine is shared: OpenMP threads spin-waiting on busy cores make
    CPU-heavy tests several times slower); restored after the test.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``, a test by taking it
    as an argument.
    """
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """:func:`one_thread` for a whole module, its module-scoped fixtures included (they are set up
    after it): ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    with _torch_threads(1):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (``CI`` set), a test skipped for want of the shared coco128 data fails instead: CI has
    the data (``tests/shared_data.py``), so such a skip hides a broken path."""
    import os

    from shared_data import SKIP_REASON

    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and isinstance(report.longrepr, tuple) \
            and SKIP_REASON in str(report.longrepr[2]):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where the shared data must be present: {report.longrepr[2]}"
