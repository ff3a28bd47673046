"""Where the tests find the shared real data (not a test module): coco128, 128 COCO images with their
official annotations, in ``../shared/data/coco128`` beside the repository, or where ``DETKIT_COCO128``
points.

A test that needs it calls :func:`require_coco128` (or is marked :data:`needs_coco128`): without the
data it skips with a reason starting with :data:`SKIP_REASON`. Under CI (``CI`` set) ``conftest.py``
turns such a skip into a failure: CI has the data, so a skip there means a broken path, not a
missing dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "DETKIT_COCO128"
SKIP_REASON = "needs the shared coco128 data"


def coco128_root() -> Path:
    """``$DETKIT_COCO128``, else ``<repo>/../shared/data/coco128``."""
    env = os.environ.get(ENV, "").strip()
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def _missing(*needed: str) -> list[Path]:
    root = coco128_root()
    return [root / n for n in (needed or ("annotations.json", "images")) if not (root / n).exists()]


def _reason(missing: list[Path]) -> str:
    return f"{SKIP_REASON}: {', '.join(map(str, missing))} not found (set {ENV}=FOLDER)"


def require_coco128(*needed: str) -> Path:
    """The coco128 folder; skips the calling test (reason :data:`SKIP_REASON`) when ``needed`` (paths
    inside it; default ``annotations.json`` and ``images``) are not all there."""
    missing = _missing(*needed)
    if missing:
        pytest.skip(_reason(missing))
    return coco128_root()


#: the same as a marker, decided at collection
needs_coco128 = pytest.mark.skipif(bool(_missing()), reason=_reason(_missing()))
