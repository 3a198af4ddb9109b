"""Drawing detections on frames (for ``viddet demo``'s annotated video)."""
from __future__ import annotations

import colorsys
from typing import Sequence, Tuple

import cv2
import numpy as np

from viddet.structures import Detections


def class_color(label: int) -> Tuple[int, int, int]:
    """A distinct, saturated BGR colour for class ``label`` (hues spaced by the golden ratio)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image_bgr: np.ndarray, detections: Detections, class_names: Sequence[str],
                    score_thr: float = 0.5, thickness: int = 2) -> np.ndarray:
    """Draws the boxes scoring >= ``score_thr`` with a ``"name 0.87"`` label on a filled tag.

    Args:
        image_bgr: (H, W, 3) uint8 BGR frame; not modified.
        detections: boxes (n, 4) in original pixels of this frame, scores (n,), labels (n,)
            (tensors on any device).
        class_names: name of each label index (e.g. :data:`viddet.VID_CLASSES`).
        score_thr: boxes scoring below this are not drawn.
        thickness: box line width in pixels.

    Returns:
        A new (H, W, 3) uint8 BGR array. Each class has its own colour (:func:`class_color`);
        the label sits above the box, or inside it when the box touches the top edge. Lower
        scores are drawn first so the most confident boxes end up on top.
    """
    out = image_bgr.copy()
    boxes = detections.boxes.detach().cpu().float().numpy().reshape(-1, 4)
    scores = detections.scores.detach().cpu().float().numpy().reshape(-1)
    labels = detections.labels.detach().cpu().numpy().reshape(-1)
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(out.shape[:2]) / 1200)
    text_thickness = max(1, thickness // 2)
    for i in np.argsort(scores, kind='stable'):
        if scores[i] < score_thr:
            continue
        color = class_color(int(labels[i]))
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else str(int(labels[i]))
        text = f'{name} {scores[i]:.2f}'
        (tw, th), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
        tag_h = th + baseline + 2
        top = y1 - tag_h if y1 - tag_h >= 0 else y1   # above the box, else inside it
        cv2.rectangle(out, (x1, top), (x1 + tw + 4, top + tag_h), color, cv2.FILLED)
        text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        cv2.putText(out, text, (x1 + 2, top + th + 1), font, font_scale, text_color,
                    text_thickness, cv2.LINE_AA)
    return out
