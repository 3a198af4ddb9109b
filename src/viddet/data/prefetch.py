"""Decoding ahead in a background thread: :class:`Prefetcher`, which :class:`viddet.data.frames.FrameSource`
uses to overlap decoding with the model."""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Callable, Iterator, Optional

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs ``make_frames()`` in a daemon thread, handing frames over through a bounded queue."""

    def __init__(self, make_frames: Callable[[], Iterator], limit: Optional[int],
                 depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_frames, limit),
                                        name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, make_frames, limit) -> None:
        frames = None
        try:
            frames = make_frames()
            # islice stops *before* pulling frame `limit` (an endless camera iterable is not drained)
            for frame in (frames if limit is None else itertools.islice(frames, limit)):
                if not self._put(frame):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        finally:
            if frames is not None:
                frames.close()   # runs the generator's cleanup (closes the container) here
        self._put(_END)

    def __iter__(self) -> Iterator:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive():
                    if self._queue.empty():
                        return
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
