"""A large COCO file's ``annotations`` read in several processes at once.

Most of the time of a first :func:`~detkit.data.coco.load_coco` on a train2017-sized file goes to
turning JSON text into Python objects (orjson: 40 million coordinates are 40 million floats) and
those objects into columns (:func:`~detkit.data.coco_annotations.fast_fields`). Both scale with the
number of annotations, one after the other, so the ``annotations`` array is cut into slices between
two of its objects and each slice is read by its own forked process (one per CPU), while the
caller parses the rest of the file::

    {"images": [...], "annotations": [{...}, ..., {...}, {...}, ..., {...}], "categories": [...]}
                                      |  slice 0          | slice 1         |
                                      start               cut               end (the first "}]")

Why the result equals a whole-file parse. The cuts are found by text search (``"annotations": [``,
then ``}, {`` after each even share of the bytes, then the first ``}]``), which a string value or a
nested list of objects could fool. But a cut at the wrong place leaves an unclosed string or bracket
in a slice or in the rest of the file, and then that part does not parse. When every slice parses
as a list and the rest of the file (the array emptied: ``"annotations": []``) as an object whose
``annotations`` is that empty list, the file is exactly those lists, concatenated, in that place.
Anything else (a parse error, an entry the column reader cannot take, a child that dies, no
``fork``) returns None, and the caller parses the file whole, which also names any bad entry.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import orjson

from .coco_annotations import Fields, concat_fields, fast_fields

__all__ = ["ParsedFile", "parse_in_parts", "MIN_PARALLEL_BYTES"]

#: files smaller than this are parsed in one piece (train2017's annotations are 448 MB, val2017's 25 MB)
MIN_PARALLEL_BYTES = 64 << 20

_KEY = re.compile(rb'"annotations"\s*:\s*\[\s*')
_BETWEEN = re.compile(rb"\}\s*,\s*\{")
_END = re.compile(rb"\}\s*\]")


@dataclass
class ParsedFile:
    """A file read in parts: ``data`` is its top-level object with ``annotations`` emptied, ``fields``
    the columns of every annotation, in file order."""

    data: dict
    fields: Fields


def _slices(raw: bytes, parts: int) -> Optional[list[tuple[int, int]]]:
    """Byte ranges ``[a, b)`` of up to ``parts`` slices of the ``annotations`` array's elements, in order:
    the first starts at the first element's "{", the last ends after the last one's "}", and only a
    comma and spaces lie between two slices."""
    key = _KEY.search(raw)
    if key is None or raw[key.end():key.end() + 1] != b"{":
        return None
    start = key.end()
    last = _END.search(raw, start)
    if last is None:
        return None
    end = last.start() + 1
    slices, a = [], start
    for k in range(1, parts):
        between = _BETWEEN.search(raw, max(a, start + (end - start) * k // parts), end)
        if between is None:
            break
        slices.append((a, between.start() + 1))
        a = between.end() - 1
    return slices + [(a, end)]


def _read_slice(raw: bytes, a: int, b: int) -> Optional[Fields]:
    """The fields of the annotations in ``raw[a:b]``, or None (not a list of entries :func:`fast_fields` takes)."""
    try:
        anns = orjson.loads(b"[" + raw[a:b] + b"]")
    except orjson.JSONDecodeError:
        return None
    return fast_fields(anns)


def _in_child(work: Callable[[], Optional[Fields]]) -> tuple[int, int]:
    """Fork a process that runs ``work`` and writes its pickled result to a pipe; (pid, read end)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "wb") as out:
                out.write(pickle.dumps(work(), protocol=pickle.HIGHEST_PROTOCOL))
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int) -> Optional[Fields]:
    with os.fdopen(read_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not payload:
        return None
    return pickle.loads(payload)  # our own child's output, through a pipe nobody else holds


def parse_in_parts(raw: bytes, processes: int) -> Optional[ParsedFile]:
    """The COCO file ``raw`` read with its annotations cut into ``processes`` slices (module docstring),
    or None when it cannot be (the caller then parses it whole)."""
    if processes < 2 or not hasattr(os, "fork") or sys.platform != "linux":
        return None
    slices = _slices(raw, processes)
    if slices is None or len(slices) < 2:
        return None
    # every slice in a child (which exits without freeing its objects); here, meanwhile, the rest
    children: list[tuple[int, int]] = []
    data = None
    try:
        for a, b in slices:
            children.append(_in_child(lambda a=a, b=b: _read_slice(raw, a, b)))
        data = orjson.loads(raw[:slices[0][0]] + raw[slices[-1][1]:])  # "annotations": []
    except (orjson.JSONDecodeError, OSError):  # OSError: no more processes or memory to fork; parse it whole
        data = None
    finally:  # the children started are always collected
        results = [_collect(pid, fd) for pid, fd in children]
    if len(results) < len(slices):
        return None
    if any(r is None for r in results) or not isinstance(data, dict) or data.get("annotations") != []:
        return None
    return ParsedFile(data, concat_fields(results))
