"""Training records in flat numpy buffers, shared by the data-loading workers without copying.

A COCO file of 118k images and 860k polygons held as Python objects (a dict per annotation, a
float object per coordinate) takes gigabytes, and every worker that reads a record writes to the
reference counts of the objects it touches, so the forked workers' copy-on-write pages are copied
one by one and memory grows for the whole run. :class:`RecordTable` holds the same records as a
few dozen numpy arrays instead: a worker that reads a record only reads their buffers, which stay
shared between the main process and every worker.

:class:`StringColumn` holds strings the same way; :class:`InstanceColumns` the instances of every
image (boxes, labels, annotation ids, polygons or RLE); ``RecordTable[i]`` builds the
:class:`ImageRecord` of image ``i`` on demand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union, overload

import numpy as np

__all__ = ["StringColumn", "InstanceColumns", "RecordTable", "ImageRecord", "SEG_NONE", "SEG_POLYGONS", "SEG_RLE"]

#: ``InstanceColumns.seg_kind`` values: no segmentation, polygons, an RLE dict (kept as JSON text)
SEG_NONE, SEG_POLYGONS, SEG_RLE = 0, 1, 2


def _offsets(lengths: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    """int64 [n + 1]: 0 then the running sum of ``lengths``."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.asarray(lengths, np.int64), out=out[1:])
    return out


@dataclass
class StringColumn:
    """``n`` strings in one buffer.

    Attributes:
        data: uint8 [B], the UTF-8 bytes of every string, one after the other.
        offsets: int64 [n + 1]; string ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
    """

    data: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_strings(cls, strings: Sequence[str]) -> "StringColumn":
        encoded = [s.encode("utf-8") for s in strings]
        return cls(np.frombuffer(b"".join(encoded), np.uint8).copy(), _offsets([len(b) for b in encoded]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def to_list(self) -> list[str]:
        return [self[i] for i in range(len(self))]

    def take(self, index: np.ndarray) -> "StringColumn":
        """The strings at ``index`` (int array), in that order."""
        starts, ends = self.offsets[index], self.offsets[index + 1]
        lengths = ends - starts
        offsets = _offsets(lengths)
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return StringColumn(self.data[positions], offsets)


@dataclass
class InstanceColumns:
    """The instances of every image of a :class:`RecordTable`, image after image.

    Attributes:
        offsets: int64 [N + 1]; image ``i``'s instances are rows ``offsets[i]:offsets[i + 1]``.
        boxes: float32 [M, 4] xyxy in image pixels (clipped to the image).
        labels: int64 [M] contiguous labels.
        ann_ids: int64 [M] COCO annotation ids.
        seg_kind: uint8 [M]: :data:`SEG_NONE`, :data:`SEG_POLYGONS` or :data:`SEG_RLE`.
        poly_offsets: int64 [M + 1]; instance ``k``'s polygons are ``poly_offsets[k]:poly_offsets[k + 1]``
            (none unless it has polygons).
        coord_offsets: int64 [P + 1]; polygon ``p``'s coordinates are ``coords[coord_offsets[p]:coord_offsets[p + 1]]``.
        coords: float64 [C] polygon coordinates x0, y0, x1, y1, ... as read (float64: the masks rasterize
            exactly as from the JSON).
        rle: the JSON text of each RLE segmentation (an empty string for the other instances).
    """

    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ann_ids: np.ndarray
    seg_kind: np.ndarray
    poly_offsets: np.ndarray
    coord_offsets: np.ndarray
    coords: np.ndarray
    rle: StringColumn

    def count(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def segmentation(self, k: int) -> Any:
        """Instance ``k``'s segmentation in COCO's JSON form: a list of polygons (lists of floats),
        an RLE dict, or None."""
        kind = self.seg_kind[k]
        if kind == SEG_POLYGONS:
            c = self.coord_offsets
            return [self.coords[c[p]:c[p + 1]].tolist() for p in range(self.poly_offsets[k], self.poly_offsets[k + 1])]
        if kind == SEG_RLE:
            return json.loads(self.rle[k])
        return None

    def take_images(self, index: np.ndarray) -> "InstanceColumns":
        """The instances of images ``index`` (int array), in that order (polygons and RLE included)."""
        rows = _ranges(self.offsets, index)
        polys = _ranges(self.poly_offsets, rows)
        return InstanceColumns(
            offsets=_offsets(np.diff(self.offsets)[index]), boxes=self.boxes[rows], labels=self.labels[rows],
            ann_ids=self.ann_ids[rows], seg_kind=self.seg_kind[rows],
            poly_offsets=_offsets(np.diff(self.poly_offsets)[rows]),
            coord_offsets=_offsets(np.diff(self.coord_offsets)[polys]),
            coords=self.coords[_ranges(self.coord_offsets, polys)], rle=self.rle.take(rows))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.offsets, self.boxes, self.labels, self.ann_ids, self.seg_kind,
                                      self.poly_offsets, self.coord_offsets, self.coords, self.rle.data,
                                      self.rle.offsets))


def _ranges(offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """int64: the concatenation of ``range(offsets[i], offsets[i + 1])`` for ``i`` in ``index``."""
    starts, lengths = offsets[index], offsets[index + 1] - offsets[index]
    out_offsets = _offsets(lengths)
    return np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1], dtype=np.int64)


@dataclass
class ImageRecord:
    """One image of a COCO file after validation (built by :class:`RecordTable` on demand).

    Attributes:
        image_id, file_name, path (images_dir / file_name), height, width: from the JSON.
        boxes: float32 [N, 4] xyxy (clipped to the image) of the usable non-crowd instances.
        labels: int64 [N] contiguous labels.
        segmentations: N raw COCO segmentations (polygon lists / RLE dicts) or None when absent.
        ann_ids: N annotation ids.
        crowd_boxes: float32 [M, 4] xyxy of the crowd regions (``iscrowd=1``).
        crowd_segmentations: M raw COCO segmentations of the crowd regions.
        source: the annotation file the image comes from.
    """

    image_id: int
    file_name: str
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    segmentations: list[Any]
    ann_ids: list[int]
    crowd_boxes: np.ndarray
    crowd_segmentations: list[Any] = field(default_factory=list)
    source: str = ""

    @property
    def aspect_ratio(self) -> float:
        """width / height from the JSON (no decoding)."""
        return self.width / self.height


@dataclass
class RecordTable:
    """The images of one or several COCO files, columnar: ``table[i]`` is an :class:`ImageRecord`.

    Attributes:
        image_ids: int64 [N] COCO image ids (unique within a file).
        heights, widths: int32 [N] image sizes from the JSON.
        file_names: the ``file_name`` of each image (relative to its images folder).
        set_index: int16 [N], the annotation file (index into ``sources`` / ``images_dirs``) of each image.
        instances: the usable non-crowd instances of each image.
        crowds: the crowd regions (``iscrowd`` set) of each image.
        sources: the annotation files; images_dirs: the folder of each one's images.
    """

    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    file_names: StringColumn
    set_index: np.ndarray
    instances: InstanceColumns
    crowds: InstanceColumns
    sources: list[str]
    images_dirs: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> str:
        """The image file of record ``i``."""
        return os.path.join(self.images_dirs[self.set_index[i]], self.file_names[i])

    def _record(self, i: int) -> ImageRecord:
        inst, crowd = self.instances, self.crowds
        a, b = inst.offsets[i], inst.offsets[i + 1]
        c, d = crowd.offsets[i], crowd.offsets[i + 1]
        return ImageRecord(
            image_id=int(self.image_ids[i]), file_name=self.file_names[i], path=self.path(i),
            height=int(self.heights[i]), width=int(self.widths[i]),
            boxes=inst.boxes[a:b].copy(), labels=inst.labels[a:b].copy(),
            segmentations=[inst.segmentation(k) for k in range(a, b)], ann_ids=inst.ann_ids[a:b].tolist(),
            crowd_boxes=crowd.boxes[c:d].copy(), crowd_segmentations=[crowd.segmentation(k) for k in range(c, d)],
            source=self.sources[self.set_index[i]],
        )

    @overload
    def __getitem__(self, i: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[ImageRecord]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[ImageRecord, list[ImageRecord]]:
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} images")
        return self._record(int(i) % n)

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self._record(i) for i in range(len(self)))

    def take(self, index: np.ndarray) -> "RecordTable":
        """The records at ``index`` (int array), in that order."""
        return RecordTable(self.image_ids[index], self.heights[index], self.widths[index],
                           self.file_names.take(index), self.set_index[index], self.instances.take_images(index),
                           self.crowds.take_images(index), list(self.sources), list(self.images_dirs))

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return (sum(a.nbytes for a in (self.image_ids, self.heights, self.widths, self.set_index,
                                       self.file_names.data, self.file_names.offsets))
                + self.instances.nbytes + self.crowds.nbytes)

    @staticmethod
    def concatenate(tables: Sequence["RecordTable"], label_maps: Optional[Sequence[np.ndarray]] = None) -> "RecordTable":
        """One table of ``tables`` one after the other; ``label_maps[t]`` (int64 [K_t]) maps table ``t``'s
        labels to the merged label space (identity when None)."""
        def labels_of(cols: InstanceColumns, t: int) -> np.ndarray:
            return cols.labels if label_maps is None else label_maps[t][cols.labels]

        def cat_instances(get) -> InstanceColumns:  # type: ignore[no-untyped-def]
            parts = [get(t) for t in tables]
            return InstanceColumns(
                offsets=_cat_offsets([p.offsets for p in parts]), boxes=np.concatenate([p.boxes for p in parts]),
                labels=np.concatenate([labels_of(p, t) for t, p in enumerate(parts)]),
                ann_ids=np.concatenate([p.ann_ids for p in parts]), seg_kind=np.concatenate([p.seg_kind for p in parts]),
                poly_offsets=_cat_offsets([p.poly_offsets for p in parts]),
                coord_offsets=_cat_offsets([p.coord_offsets for p in parts]),
                coords=np.concatenate([p.coords for p in parts]),
                rle=StringColumn(np.concatenate([p.rle.data for p in parts]),
                                 _cat_offsets([p.rle.offsets for p in parts])))

        sources, dirs, set_index = [], [], []
        for t in tables:
            set_index.append(t.set_index + len(sources))
            sources += t.sources
            dirs += t.images_dirs
        names = StringColumn(np.concatenate([t.file_names.data for t in tables]),
                             _cat_offsets([t.file_names.offsets for t in tables]))
        return RecordTable(
            np.concatenate([t.image_ids for t in tables]), np.concatenate([t.heights for t in tables]),
            np.concatenate([t.widths for t in tables]), names, np.concatenate(set_index).astype(np.int16),
            cat_instances(lambda t: t.instances), cat_instances(lambda t: t.crowds), sources, dirs)


def _cat_offsets(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Offset arrays of consecutive buffers as one offset array over their concatenation."""
    out, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        out.append(p[1:] + base)
        base += int(p[-1])
    return np.concatenate(out)
