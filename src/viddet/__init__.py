"""viddet: video object detection (DFF, FGFA, SELSA, Temporal RoI Align) on Faster R-CNN DC5.

Loads MMTracking model-zoo checkpoints unchanged and reproduces their detections::

    from viddet import VideoDetector
    detector = VideoDetector.from_checkpoint('selsa_r50')
    for result in detector.predict('video.mp4'):
        print(result.frame.index, result.detections.boxes)

``import viddet`` loads only this file and the few names below; ``VideoDetector`` (and with it torch
and the models) is imported on first use.
"""
from viddet.version import __version__
from viddet.errors import VidDetError
from viddet.classes import VID_CLASSES, VID_SYNSETS

__all__ = ['__version__', 'VidDetError', 'VID_CLASSES', 'VID_SYNSETS', 'VideoDetector']


def __getattr__(name: str):
    """``viddet.VideoDetector``, imported on first use (PEP 562)."""
    if name == 'VideoDetector':
        from viddet.api import VideoDetector
        return VideoDetector
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
