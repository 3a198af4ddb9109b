"""draw_detections: draws only confident boxes, in the class colour, without touching the input."""
import numpy as np
import torch

from viddet import VID_CLASSES
from viddet.structures import Detections
from viddet.visualize import class_color, draw_detections


def _dets(boxes, scores, labels):
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.int64))


def test_draws_confident_boxes_in_class_colour():
    image = np.full((200, 300, 3), 40, np.uint8)
    before = image.copy()
    dets = _dets([[50, 80, 150, 180], [200, 100, 280, 190]], [0.9, 0.3], [3, 7])
    out = draw_detections(image, dets, VID_CLASSES, score_thr=0.5, thickness=2)
    np.testing.assert_array_equal(image, before)            # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    colour = np.array(class_color(3), np.uint8)
    np.testing.assert_array_equal(out[130, 50], colour)     # left edge of the box
    np.testing.assert_array_equal(out[180, 100], colour)    # bottom edge
    np.testing.assert_array_equal(out[130, 100], before[130, 100])  # inside: unchanged
    # the label tag sits above the box, filled with the class colour
    tag = out[60:80, 50:60].reshape(-1, 3)
    assert (tag == colour).all(1).sum() > 20
    # the 0.3 box is below the threshold: nothing drawn there
    np.testing.assert_array_equal(out[95:200, 195:300], before[95:200, 195:300])


def test_label_at_top_edge_goes_inside_and_empty_detections():
    image = np.zeros((100, 100, 3), np.uint8)
    out = draw_detections(image, _dets([[10, 0, 90, 90]], [0.99], [0]), ['plane'])
    assert (out[5:12, 12:30] == class_color(0)).all(-1).any()   # tag inside the box
    out = draw_detections(image, Detections.empty(), VID_CLASSES)
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_class_colours_are_distinct():
    colours = {class_color(c) for c in range(len(VID_CLASSES))}
    assert len(colours) == len(VID_CLASSES)
