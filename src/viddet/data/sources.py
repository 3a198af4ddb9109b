"""Opening frame sources: :func:`open_source` turns a folder of frames, a video file, or a live
camera / network stream into a :class:`~viddet.data.frames.FrameSource`.

Every source iterates frames in order (decoded ahead by a background thread) and, unless live,
offers random access ``source.get(index)`` with an LRU cache (:mod:`viddet.data.frames`). The kinds:

* folder (:class:`~viddet.data.image_sources.FolderSource`): each ``get`` decodes that one file (cost
  independent of the index); decoded by OpenCV exactly as MMTracking's loader, in MMTracking's
  demo order (:mod:`viddet.data.image_sources`, which also holds explicit file lists and arrays).
* video file (:class:`~viddet.data.video_sources.VideoFileSource`): decoded by PyAV with exact frame
  indices; a far jump costs at most one GOP of decoding (:mod:`viddet.data.video_sources`).
* live camera / stream (:class:`~viddet.data.video_sources.LiveSource`): no random access
  (:class:`viddet.VidDetError`); use online methods.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from viddet.data.frames import FrameSource
from viddet.data.image_sources import IMAGE_SUFFIXES, FolderSource
from viddet.data.video_sources import LiveSource, VideoFileSource
from viddet.errors import VidDetError


def open_source(spec: str, *, max_frames: Optional[int] = None, prefetch: Optional[int] = None,
                cache_frames: int = 32) -> FrameSource:
    """Opens a folder of frames, a video file, a camera or a network stream.

    Args:
        spec: a folder of ``.jpg/.jpeg/.png`` frames; a video file; a camera device
            (``/dev/video0``, or an integer such as ``"0"`` for ``/dev/video0``); or an
            ``rtsp://``, ``http://``, ``https://`` URL (treated as a live stream).
        max_frames: read only the first ``max_frames`` frames (None: all).
        prefetch: frames decoded ahead by a background thread during iteration (0: decode in the
            caller's thread; None: 4 when torch leaves a core spare, else 0).
        cache_frames: frames kept by :meth:`FrameSource.get` (LRU) for random access; each costs
            H * W * 3 bytes (6.2 MB at 1920x1080, so 32 frames are 200 MB).

    Returns:
        A :class:`FrameSource` (:class:`FolderSource`, :class:`VideoFileSource` or
        :class:`LiveSource`). The folder or file is checked (listed, first frame decoded) now.

    Raises:
        VidDetError: the path does not exist; a folder with no images; a single image instead
            of a folder; a file that is not a video PyAV can decode; a video with no frames;
            a camera or stream that cannot be opened.
    """
    spec = str(spec)
    kwargs = dict(max_frames=max_frames, prefetch=prefetch, cache_frames=cache_frames)
    if re.fullmatch(r'\d+', spec):
        return LiveSource(f'/dev/video{spec}', **kwargs)
    if re.match(r'(rtsp|rtsps|rtmp|http|https)://', spec, re.IGNORECASE) or spec.startswith('/dev/'):
        return LiveSource(spec, **kwargs)
    path = Path(spec)
    if not path.exists():
        raise VidDetError(f'{spec} does not exist')
    if path.is_dir():
        return FolderSource(spec, **kwargs)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise VidDetError(f'{spec} is a single image: give the folder that contains the frames')
    return VideoFileSource(spec, **kwargs)
