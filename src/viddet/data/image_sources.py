"""Frame sources of images: image files (:class:`ImageListSource`, :class:`FolderSource`) and
arrays in memory (:class:`ArraySource`).

Folder ordering follows MMTracking's demo (``sorted(..., key=int(stem))``). Frame files are decoded
by OpenCV from the file bytes (``cv2.imdecode(..., IMREAD_COLOR)``), which is exactly MMTracking's
loader (``mmcv.imfrombytes`` with the cv2 backend), so detections match its test script bit for
bit. Random access (``get``) decodes that one file (cost independent of the index).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import cv2
import numpy as np

from viddet.data.frames import Frame, FrameSource
from viddet.errors import VidDetError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
"""Image file suffixes of a frame folder (compared case-insensitively, so ``.JPEG`` counts)."""

def _frame_sort_key(names: List[str]):
    """Numeric order of stems when all are integers (MMTracking: ``int(name.split('.')[0])``)."""
    if all(Path(n).stem.isdigit() for n in names):
        return lambda n: (int(Path(n).stem), n)
    return lambda n: n


def _decode_image_file(path: Path, index: int) -> np.ndarray:
    """Decodes one frame file to (H, W, 3) uint8 BGR exactly as mmcv's cv2 backend does."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VidDetError(f'cannot read frame {index} ({path}): {e.strerror}') from None
    # libjpeg only *warns* about a truncated file and returns grey rows, so check the EOI marker.
    if path.suffix.lower() in ('.jpg', '.jpeg') and not data.rstrip(b'\0').endswith(b'\xff\xd9'):
        raise VidDetError(f'frame {index} ({path}) is a truncated or corrupt JPEG '
                          f'(no end-of-image marker)')
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise VidDetError(f'frame {index} ({path}) is not an image OpenCV can decode')
    return image


class ImageListSource(FrameSource):
    """An explicit, ordered list of frame image files (e.g. one video of a COCO-VID annotation file).

    Args:
        files: frame paths in playback order.
        path: a name for messages (default: the first file's folder).
    """

    def __init__(self, files, path: Optional[str] = None, **kwargs):
        files = [Path(f) for f in files]
        if not files:
            raise VidDetError(f'{path or "image list"} contains no frames')
        super().__init__(path or str(files[0].parent), **kwargs)
        first = _decode_image_file(files[0], 0)
        self.files = files[:self.max_frames]
        self.length = len(self.files)
        self.height, self.width = first.shape[:2]

    def _load(self, index: int) -> Frame:
        return Frame(index, self.files[index].name, _decode_image_file(self.files[index], index))

    def _frames(self) -> Iterator[Frame]:
        for i in range(self.length):
            yield self._load(i)

    def _read(self, index: int) -> Frame:
        frame = self._load(index)
        self._remember(frame)
        return frame


class FolderSource(ImageListSource):
    """A folder of frame images (``.jpg``, ``.jpeg``, ``.png`` in any case), e.g. ImageNet VID's
    ``000000.JPEG ...``. Ordered by integer stem when every stem is a number (so ``2.jpg`` comes
    before ``10.jpg``), else by name. Hidden files and other files are ignored."""

    def __init__(self, path: str, **kwargs):
        folder = Path(path)
        names = [p.name for p in folder.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.') and p.is_file()]
        if not names:
            raise VidDetError(f'{path} contains no images ({", ".join(IMAGE_SUFFIXES)})')
        names.sort(key=_frame_sort_key(names))
        super().__init__([folder / n for n in names], path=path, **kwargs)


class ArraySource(FrameSource):
    """Frames already in memory: (H, W, 3) uint8 BGR arrays (Python API).

    A sequence (list, tuple) has a length and random access, so offline methods run on it; any other
    iterable (a generator, a camera loop) is consumed once, in order, like a live stream (online
    methods only, ``is_live`` True). Frame names are the indices as ``%06d``.

    Raises:
        VidDetError: an element that is not an (H, W, 3) uint8 array (when it is reached).
    """

    def __init__(self, frames, path: str = '<arrays>', **kwargs):
        super().__init__(path, **kwargs)
        if isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
            self._items = list(frames)[:self.max_frames]
            self.length = len(self._items)
            self._iterable = None
        else:
            self._items = None
            self._iterable = iter(frames)
            self.is_live = True
            self.length = None

    @staticmethod
    def _check(index: int, image) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise VidDetError(f'frame {index}: expected an (H, W, 3) uint8 BGR array, got '
                              f'{image.dtype} of shape {image.shape}')
        return image

    def _frames(self) -> Iterator[Frame]:
        items = self._items if self._items is not None else self._iterable
        for i, image in enumerate(items):
            yield Frame(i, f'{i:06d}', self._check(i, image))

    def _read(self, index: int) -> Frame:
        frame = Frame(index, f'{index:06d}', self._check(index, self._items[index]))
        self._remember(frame)
        return frame
