"""Linking per-frame detections of a video into tracks: Seq-NMS (offline) or an IoU tracker (online).

* :func:`viddet.linking.link.link_video` — one entry point for a whole video's list of
  :class:`~viddet.structures.Detections` and a link mode (``'seqnms'``, ``'online'``, ``'none'``;
  :data:`~viddet.linking.link.LINK_MODES`).
* :class:`viddet.linking.tracker.IoUTracker` — the online tracker, also in streaming form:
  ``update(detections)`` per frame, ``reset()``.
* :mod:`viddet.linking.seqnms` — Seq-NMS on numpy arrays (:mod:`viddet.linking.seqnms_paths`: its
  incremental search of one class; :mod:`viddet.linking.iou`: its +1-convention IoU and NMS).

See docs/linking.md for the thresholds, their defaults and the complexity.
"""
