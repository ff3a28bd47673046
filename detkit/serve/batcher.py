"""Micro-batching: images of concurrent requests share one forward pass, run by ONE worker thread.

A request :meth:`MicroBatcher.submit`\\ s its image and awaits the returned future
(``await asyncio.wrap_future(fut)``), so the event loop never waits for the model. The worker
takes the oldest waiting image, then collects more until the batch holds ``max_batch`` images or
``max_wait_ms`` have passed since that first image was submitted, and calls ``predict`` on the
list. Only this thread calls ``predict``, so two batches never run at once. At most
``queue_size`` images wait; :meth:`submit` raises :class:`QueueFull` beyond that (the server
answers 503).

A batch holds images of one size only (``H x W``): the detector zero-pads a batch to its largest
image, which changes the detections of the smaller ones, so an image met while collecting a batch
of another size is held back (at most ``max_batch`` of them, oldest first) for the next batch.
Thus an answer does not depend on what else was in flight: batched results equal unbatched ones
up to float rounding.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..inference.predictor import Prediction

__all__ = ["BatchResult", "MicroBatcher", "QueueFull", "ShuttingDown"]

#: ``predict(images, masks=[flag per image]) -> predictions``, e.g. :meth:`detkit.inference.predictor.Predictor.predict`
PredictFn = Callable[..., list[Prediction]]


class QueueFull(RuntimeError):
    """``queue_size`` images are already waiting for the model."""


class ShuttingDown(RuntimeError):
    """The batcher was closed before the image was predicted."""


@dataclass(frozen=True)
class BatchResult:
    """The prediction of one submitted image and how it was made.

    Attributes:
        prediction: detections in the image's pixels.
        queue_ms: from :meth:`MicroBatcher.submit` to the start of its batch's forward pass.
        inference_ms: the batch's ``predict`` call (shared by every image of the batch).
        batch_size: images in that batch.
    """

    prediction: Prediction
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Item:
    image: np.ndarray
    future: Future
    submitted: float  # time.perf_counter() at submit
    masks: bool = True  # paste this image's instance masks


_STOP = object()  # tells the worker to finish


class MicroBatcher:
    """Feed ``predict(list_of_images) -> list_of_predictions`` from a bounded queue, in batches.

    Args:
        predict: e.g. :meth:`detkit.inference.predictor.Predictor.predict`; called from the worker thread only.
        max_batch: most images per call (1: no batching).
        max_wait_ms: a batch waits at most this long after its first image was submitted.
        queue_size: most images waiting in the queue (not counting the batch being predicted and the
            at most ``max_batch`` images held back for being of another size than their batch).

    The worker starts with :meth:`start` (or the first :meth:`submit`) and ends with :meth:`close`.
    """

    def __init__(self, predict: PredictFn, max_batch: int = 4, max_wait_ms: float = 10.0, queue_size: int = 64) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError(f"MicroBatcher: need max_batch >= 1, queue_size >= 1, max_wait_ms >= 0; got "
                             f"{max_batch}, {queue_size}, {max_wait_ms}")
        self.predict = predict
        self.max_batch = int(max_batch)
        self.max_wait_ms = float(max_wait_ms)
        self.queue_size = int(queue_size)
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._held: list[_Item] = []  # taken from the queue, another size than their batch; worker only

    @property
    def waiting(self) -> int:
        """Images submitted and not yet taken into a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker thread (no-op when running)."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="detkit-serve-batcher", daemon=True)
                self._thread.start()

    def submit(self, image: np.ndarray, masks: bool = True) -> "Future[BatchResult]":
        """Queue ``image`` (uint8 HxWx3 RGB); the future gets its :class:`BatchResult` or the
        exception ``predict`` raised. ``masks``: whether this image's instance masks are pasted (the
        batch's ``predict`` gets one flag per image). Raises :class:`QueueFull` when ``queue_size``
        images wait."""
        self.start()
        item = _Item(image, Future(), time.perf_counter(), bool(masks))
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"{self.queue_size} images are waiting for the model; retry shortly") from None
        return item.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the waiting images with :class:`ShuttingDown`, stop."""
        with self._lock:
            self._closed, thread = True, self._thread
        if thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass  # the worker is stuck in predict: it is a daemon thread, leave it
        thread.join(timeout)
        self._fail_waiting()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            first = self._held.pop(0) if self._held else self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._run_batch(batch)
            if stop:
                break
        self._fail_waiting()

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        """``first`` and the images of its size that are held back or arrive until the batch is full
        or its wait is over; True as second value when the stop marker was met."""
        size = first.image.shape[:2]
        batch, held = [first], []
        for it in self._held:
            (batch if it.image.shape[:2] == size and len(batch) < self.max_batch else held).append(it)
        self._held = held
        deadline = first.submitted + self.max_wait_ms / 1000.0
        while len(batch) < self.max_batch and len(self._held) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            (batch if item.image.shape[:2] == size else self._held).append(item)
        return batch, False

    def _run_batch(self, batch: list[_Item]) -> None:
        live = [it for it in batch if it.future.set_running_or_notify_cancel()]  # drop abandoned requests
        if not live:
            return
        start = time.perf_counter()
        try:
            preds = self.predict([it.image for it in live], masks=[it.masks for it in live])
            if len(preds) != len(live):
                raise RuntimeError(f"predict returned {len(preds)} predictions for {len(live)} images")
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error; the worker lives on
            for it in live:
                it.future.set_exception(e)
            return
        inference_ms = (time.perf_counter() - start) * 1000.0
        for it, pred in zip(live, preds):
            it.future.set_result(BatchResult(pred, (start - it.submitted) * 1000.0, inference_ms, len(live)))

    def _fail_waiting(self) -> None:
        held, self._held = self._held, []
        while True:
            try:
                held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in held:
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(ShuttingDown("the server is shutting down"))
