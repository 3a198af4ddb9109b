"""viddet: video object detection (DFF, FGFA, SELSA, Temporal RoI Align) on Faster R-CNN DC5.

Loads MMTracking model-zoo checkpoints unchanged and reproduces their detections::

    from viddet import VideoDetector
    detector = VideoDetector.from_checkpoint('selsa_r50')
    for result in detector.predict('video.mp4'):
        print(result.frame.index, result.detections.boxes)
"""
from viddet.version import __version__
from viddet.errors import VidDetError
from viddet.classes import VID_CLASSES, VID_SYNSETS
from viddet.api import VideoDetector

__all__ = ['__version__', 'VidDetError', 'VID_CLASSES', 'VID_SYNSETS', 'VideoDetector']
