"""Drawing detections on frames (for ``viddet demo``'s annotated video)."""
from __future__ import annotations

import colorsys
from typing import Sequence, Tuple

import cv2
import numpy as np

from viddet.structures import Detections

UNTRACKED_COLOR = (160, 160, 160)
"""BGR grey of the boxes that linking left without a track (track id -1)."""


def _palette(k: int) -> Tuple[int, int, int]:
    """The k-th colour of a saturated BGR palette: hues spaced by the golden ratio, so that
    neighbouring indices get clearly different colours."""
    hue = (k * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def class_color(label: int) -> Tuple[int, int, int]:
    """The BGR colour of class ``label`` (unlinked detections)."""
    return _palette(label)


def track_color(track_id: int) -> Tuple[int, int, int]:
    """The BGR colour of track ``track_id`` (linked detections): the same in every frame of the
    video; :data:`UNTRACKED_COLOR` for -1."""
    return UNTRACKED_COLOR if track_id < 0 else _palette(track_id)


def box_label(name: str, score: float, track_id: int = -1) -> str:
    """The text drawn on a box: ``"car 0.91"``, or ``"car #3 0.91"`` for track 3."""
    return f'{name} #{track_id} {score:.2f}' if track_id >= 0 else f'{name} {score:.2f}'


def draw_detections(image_bgr: np.ndarray, detections: Detections, class_names: Sequence[str],
                    score_thr: float = 0.5, thickness: int = 2) -> np.ndarray:
    """Draws the boxes scoring >= ``score_thr`` with a label (:func:`box_label`) on a filled tag.

    Args:
        image_bgr: (H, W, 3) uint8 BGR frame; not modified.
        detections: boxes (n, 4) in original pixels of this frame, scores (n,), labels (n,),
            optional track_ids (n,) (tensors on any device).
        class_names: name of each label index (e.g. :data:`viddet.VID_CLASSES`).
        score_thr: boxes scoring below this are not drawn.
        thickness: box line width in pixels.

    Returns:
        A new (H, W, 3) uint8 BGR array. Unlinked detections (``track_ids`` None) are coloured by
        class (:func:`class_color`); linked ones by track (:func:`track_color`, grey for -1), with
        the id in the label (``"car #3 0.91"``). The label sits above the box, or inside it when
        the box touches the top edge. Lower scores are drawn first so the most confident boxes
        end up on top.
    """
    out = image_bgr.copy()
    boxes = detections.boxes.detach().cpu().float().numpy().reshape(-1, 4)
    scores = detections.scores.detach().cpu().float().numpy().reshape(-1)
    labels = detections.labels.detach().cpu().numpy().reshape(-1)
    tracks = None if detections.track_ids is None else detections.track_ids.detach().cpu().numpy().reshape(-1)
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(out.shape[:2]) / 1200)
    text_thickness = max(1, thickness // 2)
    for i in np.argsort(scores, kind='stable'):
        if scores[i] < score_thr:
            continue
        track = -1 if tracks is None else int(tracks[i])
        color = class_color(int(labels[i])) if tracks is None else track_color(track)
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else str(int(labels[i]))
        text = box_label(name, float(scores[i]), track)
        (tw, th), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
        tag_h = th + baseline + 2
        top = y1 - tag_h if y1 - tag_h >= 0 else y1   # above the box, else inside it
        cv2.rectangle(out, (x1, top), (x1 + tw + 4, top + tag_h), color, cv2.FILLED)
        text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        cv2.putText(out, text, (x1 + 2, top + th + 1), font, font_scale, text_color,
                    text_thickness, cv2.LINE_AA)
    return out
