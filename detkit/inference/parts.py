"""Part files of an inference run: what lets ``tools/infer.py`` split a folder over processes and
continue a stopped run with ``--resume``.

With ``--save-json results.json`` every process appends one JSON line per finished image to its own
part file in ``results.json.parts/`` and flushes it, so a run killed at any point keeps what it
finished::

    {"index": 12, "file": "000012.jpg", "records": [{"image_id": 12, "bbox": [...], ...}, ...]}

``index`` is the image's position in the sorted input (never the process's share of it), so the
parts of a stopped run can be continued by any number of processes. ``manifest.json`` in the same
folder holds the settings that decide the records (:func:`run_settings`); ``--resume`` refuses
other settings (:func:`settings_difference`). When every process is done, rank 0 merges the
parts into one COCO results list in input order (:func:`merge_parts`) and deletes the folder.

Nothing here talks to other processes: :mod:`detkit.inference.runner` decides who calls what.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence

from ..errors import DetkitError, UsageError
from ..fileio import write_json_atomic

__all__ = [
    "MANIFEST",
    "PartLine",
    "PartsPlan",
    "PartWriter",
    "shard_indices",
    "parts_dir_for",
    "part_path",
    "file_sha256",
    "run_settings",
    "settings_difference",
    "read_parts",
    "prepare_parts",
    "merge_parts",
    "PartsMissing",
    "remove_parts",
]

#: name of the settings file in a parts folder
MANIFEST = "manifest.json"
_PART_NAME = re.compile(r"run(\d+)-rank(\d+)\.jsonl")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The share of ``indices`` that process ``rank`` of ``world_size`` predicts: a contiguous block;
    the blocks of ranks ``0..world_size-1`` are in order, cover every index exactly once and differ
    in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: rank {rank} is not in [0, {world_size})")
    n = len(indices)
    return list(indices[rank * n // world_size : (rank + 1) * n // world_size])


def parts_dir_for(save_json: str | Path) -> Path:
    """The parts folder of ``--save-json save_json``: ``<save_json>.parts`` next to it."""
    path = Path(save_json)
    return path.with_name(path.name + ".parts")


def part_path(parts_dir: Path, run: int, rank: int) -> Path:
    """The part file of process ``rank`` in the ``run``-th start (1, 2, ...) of a run.

    Each start writes new files, so a half-written last line of a stopped start is never appended to."""
    return Path(parts_dir) / f"run{run}-rank{rank}.jsonl"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def run_settings(config: Mapping[str, Any], weights: Optional[str], score_thresh: float, precision: str,
                 coco_json: Optional[str], file_names: Sequence[str], class_names: Sequence[str],
                 category_ids: Optional[Sequence[int]]) -> dict[str, Any]:
    """What decides a run's records, as a flat ``{what: JSON value}`` dict; ``what`` is how a
    message names it (a flag, or ``config <dotted key>``).

    Args:
        config: the resolved config as plain types; its ``model``, ``input`` and ``test`` sections count.
        weights: the ``--weights`` file (identified by its SHA-256 and name), or None (the config's).
        file_names: the input's image names in input order (identified by count and SHA-256).
    """
    names_sha = hashlib.sha256("\n".join(file_names).encode("utf-8")).hexdigest()[:16]
    settings: dict[str, Any] = {
        "--score-thresh": float(score_thresh),
        "--weights": None if weights is None else f"{Path(weights).name} sha256 {file_sha256(weights)[:16]}",
        "--precision": precision,
        "--coco-json": None if coco_json is None else str(Path(coco_json).resolve()),
        "--input": f"{len(file_names)} images, names sha256 {names_sha}",
        "class names": list(class_names),
        "category ids": None if category_ids is None else [int(c) for c in category_ids],
    }
    for section in ("model", "input", "test"):
        _flat(f"config {section}", config.get(section, {}), settings)
    return json.loads(json.dumps(settings))  # as the manifest reads back: tuples become lists


def settings_difference(then: Mapping[str, Any], now: Mapping[str, Any]) -> Optional[str]:
    """``"<what> (<then> then, <now> now)"`` for the first setting that differs; None when all agree."""
    for key in list(now) + [k for k in then if k not in now]:
        old, new = then.get(key, "unset"), now.get(key, "unset")
        if old != new:
            return f"{key} ({json.dumps(old)} then, {json.dumps(new)} now)"
    return None


@dataclass(frozen=True)
class PartLine:
    """One finished image of a part file: its ``index`` in the input, its ``file`` name and its
    COCO results records (``[]`` when it has none, e.g. no detection)."""

    index: int
    file: str
    records: list[dict]


def _part_files(parts_dir: Path) -> list[tuple[int, int, Path]]:
    """(run, rank, path) of the part files, in order of run then rank."""
    found = []
    for p in Path(parts_dir).glob("run*-rank*.jsonl"):
        m = _PART_NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found, key=lambda t: (t[0], t[1]))


def _parse_line(text: str) -> Optional[PartLine]:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if (not isinstance(obj, dict) or not isinstance(obj.get("index"), int) or not isinstance(obj.get("file"), str)
            or not isinstance(obj.get("records"), list)):
        return None
    return PartLine(obj["index"], obj["file"], obj["records"])


def read_parts(parts_dir: Path, file_names: Sequence[str], warn: bool = True) -> dict[int, PartLine]:
    """The finished images recorded in ``parts_dir``'s part files, by input index.

    An incomplete or unreadable line (a process stopped while writing it) is ignored, with a
    warning when ``warn``, so its image is predicted again; an image listed twice keeps its first
    line. A line whose file name is not the input's image at its index is a :class:`UsageError`.
    """
    done: dict[int, PartLine] = {}
    for _, _, path in _part_files(parts_dir):
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            line = _parse_line(text)
            if line is None:
                if warn:
                    _warn(f"{path}: ignoring line {n}, which is incomplete (a run stopped while writing it); "
                          "its image is predicted again")
                continue
            if not 0 <= line.index < len(file_names) or file_names[line.index] != line.file:
                now = file_names[line.index] if 0 <= line.index < len(file_names) else "none"
                raise UsageError(f"{path}: line {n} records {line.file} as image {line.index} of --input, which is "
                                 f"{now} now; delete {parts_dir} to start over")
            done.setdefault(line.index, line)
    return done


@dataclass(frozen=True)
class PartsPlan:
    """Where a start of a run writes and what is left: ``run`` numbers this start's part files
    (:func:`part_path`); ``done`` are the input indices finished by earlier starts, sorted."""

    run: int
    done: list[int] = field(default_factory=list)


def prepare_parts(parts_dir: Path, settings: Mapping[str, Any], file_names: Sequence[str],
                  resume: bool) -> PartsPlan:
    """Set up ``parts_dir`` for a start of a run (rank 0 only, before any process writes parts).

    Without ``resume`` an existing folder is a :class:`UsageError` (runs are never mixed); a new
    one is created with the manifest. With ``resume`` the manifest must hold ``settings`` (else a
    :class:`UsageError` naming the first difference) and the finished images are read; without a
    folder, the run starts from the first image.
    """
    parts_dir = Path(parts_dir)
    manifest = parts_dir / MANIFEST
    if parts_dir.exists() and not resume:
        raise UsageError(f"{parts_dir} holds the parts of an unfinished run; pass --resume to continue it, or "
                         "delete that folder to start over")
    if not parts_dir.exists():
        if resume:
            print(f"note: --resume: no parts of an earlier run in {parts_dir}; starting from the first image",
                  file=sys.stderr)
        parts_dir.mkdir(parents=True)
        write_json_atomic(manifest, dict(settings), indent=1)
        return PartsPlan(1)
    try:
        then = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--resume: {manifest} is missing or unreadable, so the settings of the stopped run are "
                         f"unknown; delete {parts_dir} to start over") from None
    diff = settings_difference(then, settings) if isinstance(then, dict) else "the manifest"
    if diff is not None:
        raise UsageError(f"--resume: {diff} differs from the stopped run in {parts_dir}; rerun with the same "
                         "settings, or delete that folder to start over")
    done = read_parts(parts_dir, file_names)
    runs = [run for run, _, _ in _part_files(parts_dir)]
    return PartsPlan(max(runs, default=0) + 1, sorted(done))


class PartWriter:
    """Appends one :class:`PartLine` per finished image to a part file, flushed at once.

    ``with PartWriter(path) as w: w.write(index, file_name, records)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f: Optional[IO[str]] = None

    def __enter__(self) -> "PartWriter":
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def write(self, index: int, file_name: str, records: list[dict]) -> None:
        """Record image ``index`` (``file_name``) as finished with its ``records``."""
        assert self._f is not None, "PartWriter.write outside its with block"
        self._f.write(json.dumps({"index": index, "file": file_name, "records": records}) + "\n")
        self._f.flush()


class PartsMissing(DetkitError, RuntimeError):
    """The part files hold fewer finished images than the processes reported: the parts are kept."""


def merge_parts(parts_dir: Path, file_names: Sequence[str],
                finished: Optional[Mapping[int, str]] = None) -> tuple[list[dict], int]:
    """The records of every finished image in input order (within an image, the predictor's
    order) and the number of finished images. Incomplete lines were warned about by :func:`prepare_parts`.

    ``finished``: every input index the processes reported finished, with who finished it (e.g.
    ``"rank 1"``). When the part files do not hold exactly those images (a process wrote to a folder
    the merging process does not see, e.g. nodes without a shared filesystem, or a part file was
    deleted), :class:`PartsMissing` says which images and whose parts are missing, and nothing is
    written or deleted: the run can still be resumed.
    """
    done = read_parts(parts_dir, file_names, warn=False)
    if finished is not None and set(done) != set(finished):
        missing = sorted(set(finished) - set(done))
        extra = sorted(set(done) - set(finished))
        if missing:
            owners = sorted({finished[i] for i in missing})
            names = ", ".join(file_names[i] for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise PartsMissing(
                f"{parts_dir}: the part files hold {len(done)} of the {len(finished)} finished images; the "
                f"records of {len(missing)} ({names}), finished by {', '.join(owners)}, are not there (is "
                f"{parts_dir} on a filesystem every node shares?); kept the parts: copy the missing part "
                "files there and run again with --resume")
        raise PartsMissing(f"{parts_dir}: the part files hold {len(extra)} images no process reported finished "
                           f"({', '.join(file_names[i] for i in extra[:5])}); another run is writing to "
                           "the same folder? kept the parts")
    records: list[dict] = []
    for index in sorted(done):
        records.extend(done[index].records)
    return records, len(done)


def remove_parts(parts_dir: Path) -> None:
    """Delete a parts folder once its results file is written."""
    shutil.rmtree(parts_dir, ignore_errors=True)
