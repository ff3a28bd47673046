"""A cache of validated COCO files: the :class:`RecordTable` of a large annotation file, saved once as flat arrays.

Parsing COCO train2017 (448 MB of JSON, 40 million polygon coordinates) takes 20 s and more on every start of
every job, and every DDP rank of a node parses it again. The table it becomes is a few dozen arrays, which load
in about a second. So :func:`detkit.data.coco.load_coco` saves the table of a file of at least
:data:`MIN_CACHED_BYTES` under ``$DETKIT_HOME/coco/`` (default ``~/.cache/detkit``) and reads it back while the
file is unchanged:

* **key:** the file's absolute path, size and modification time (ns), ``filter_empty``, ``is_train`` and
  :data:`CACHE_VERSION` (bumped whenever validation rules or the table's layout change);
* **written atomically** (:func:`detkit.fileio.atomic_write`), so a crash never leaves a half cache, and read
  with ``allow_pickle=False``; a cache that cannot be read is ignored (and rewritten);
* ``DETKIT_COCO_CACHE=0`` turns it off.

What a cache hit does not repeat: the warnings naming each dropped annotation (their counts are kept and
logged again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..fileio import atomic_write, detkit_home
from .records import InstanceColumns, RecordTable, StringColumn

__all__ = ["CACHE_VERSION", "MIN_CACHED_BYTES", "CachedFile", "cache_path", "read_cached", "write_cached"]

logger = logging.getLogger("detkit")

#: bump when the validation rules or the layout of :class:`RecordTable` change
CACHE_VERSION = 1
#: smaller files parse in well under a second: not cached
MIN_CACHED_BYTES = 32 << 20
_INSTANCE_FIELDS = ("offsets", "boxes", "labels", "ann_ids", "seg_kind", "poly_offsets", "coord_offsets", "coords")


@dataclass
class CachedFile:
    """What a validated file leaves besides its table: ``class_names`` / ``category_ids`` (label order),
    ``num_dropped`` (rule -> count) and ``num_empty`` (images without usable instances)."""

    table: RecordTable
    class_names: list[str]
    category_ids: list[int]
    num_dropped: dict[str, int]
    num_empty: int


def _enabled(path: Path) -> bool:
    if os.environ.get("DETKIT_COCO_CACHE", "").strip() == "0":
        return False
    try:
        return path.stat().st_size >= MIN_CACHED_BYTES
    except OSError:
        return False


def cache_path(path: Path, filter_empty: bool, is_train: bool) -> Path:
    """Where the table of ``path`` (as it is now on disk) is cached."""
    st = path.stat()
    key = repr((CACHE_VERSION, str(path.absolute()), st.st_size, st.st_mtime_ns, bool(filter_empty), bool(is_train)))
    return detkit_home() / "coco" / f"{path.stem[:40]}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def _columns(prefix: str, cols: InstanceColumns) -> dict[str, np.ndarray]:
    out = {f"{prefix}.{name}": getattr(cols, name) for name in _INSTANCE_FIELDS}
    out[f"{prefix}.rle.data"], out[f"{prefix}.rle.offsets"] = cols.rle.data, cols.rle.offsets
    return out


def _instances(z: Any, prefix: str) -> InstanceColumns:
    return InstanceColumns(**{name: z[f"{prefix}.{name}"] for name in _INSTANCE_FIELDS},
                           rle=StringColumn(z[f"{prefix}.rle.data"], z[f"{prefix}.rle.offsets"]))


def write_cached(path: Path, filter_empty: bool, is_train: bool, cached: CachedFile) -> None:
    """Save ``cached`` (the validated ``path``) when the file is large enough; a failure only logs."""
    if not _enabled(path):
        return
    t = cached.table
    meta = {"class_names": cached.class_names, "category_ids": cached.category_ids,
            "num_dropped": cached.num_dropped, "num_empty": cached.num_empty}
    arrays = {"image_ids": t.image_ids, "heights": t.heights, "widths": t.widths, "set_index": t.set_index,
              "file_names.data": t.file_names.data, "file_names.offsets": t.file_names.offsets,
              **_columns("instances", t.instances), **_columns("crowds", t.crowds),
              "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)}
    dest = cache_path(path, filter_empty, is_train)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest, binary=True) as f:
            np.savez(f, **arrays)
    except OSError as e:  # a full or read-only disk: the next load parses again
        logger.warning("could not cache %s's records at %s (%s); the next load parses the file again", path, dest, e)


def read_cached(path: Path, images_dir: Path, filter_empty: bool, is_train: bool) -> Optional[CachedFile]:
    """The cached table of ``path`` while the file is unchanged, else None."""
    if not _enabled(path):
        return None
    dest = cache_path(path, filter_empty, is_train)
    if not dest.is_file():
        return None
    try:
        with np.load(dest, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            table = RecordTable(
                image_ids=z["image_ids"], heights=z["heights"], widths=z["widths"],
                file_names=StringColumn(z["file_names.data"], z["file_names.offsets"]), set_index=z["set_index"],
                instances=_instances(z, "instances"), crowds=_instances(z, "crowds"),
                sources=[str(path)], images_dirs=[str(images_dir)])
        return CachedFile(table, list(meta["class_names"]), [int(c) for c in meta["category_ids"]],
                          {k: int(v) for k, v in meta["num_dropped"].items()}, int(meta["num_empty"]))
    except (OSError, KeyError, ValueError, TypeError) as e:  # truncated, older layout, ...: parse again
        logger.warning("ignoring the unreadable cache %s of %s (%s); parsing the file", dest, path, e)
        return None
