"""draw_detections: draws only confident boxes, in the class colour, without touching the input."""
import numpy as np
import torch

from viddet import VID_CLASSES
from viddet.structures import Detections
from viddet.visualize import UNTRACKED_COLOR, box_label, class_color, draw_detections, track_color


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


def test_linked_boxes_are_coloured_by_track_with_the_id_in_the_label():
    image = np.full((200, 300, 3), 40, np.uint8)
    dets = _dets([[50, 80, 150, 180], [200, 100, 280, 190], [10, 150, 40, 190]], [0.9, 0.8, 0.7], [3, 3, 3])
    dets.track_ids = torch.tensor([7, 2, -1])
    out = draw_detections(image, dets, VID_CLASSES)
    # two boxes of the same class, each in its own track's colour; the untracked one grey
    np.testing.assert_array_equal(out[130, 50], track_color(7))
    np.testing.assert_array_equal(out[150, 200], track_color(2))
    np.testing.assert_array_equal(out[170, 10], UNTRACKED_COLOR)
    assert track_color(7) != track_color(2) != class_color(3)
    assert box_label('car', 0.912, 3) == 'car #3 0.91' and box_label('car', 0.912) == 'car 0.91'
    # the label is the id's: the box drawn alone equals the drawing of its own label text
    alone = dets.__class__(dets.boxes[:1], dets.scores[:1], dets.labels[:1], dets.track_ids[:1])
    with_id = draw_detections(image, alone, VID_CLASSES)
    alone.track_ids = None
    without = draw_detections(image, alone, VID_CLASSES)
    tag = (slice(55, 80), slice(50, 200))
    assert (with_id[tag] != without[tag]).any()
    # same track id in another frame (another position, another class): the same colour
    moved = _dets([[60, 90, 160, 190]], [0.6], [5])
    moved.track_ids = torch.tensor([7])
    np.testing.assert_array_equal(draw_detections(image, moved, VID_CLASSES)[140, 60], track_color(7))


def test_track_colours_of_consecutive_ids_are_distinct():
    colours = [track_color(i) for i in range(50)]
    assert len(set(colours)) == 50
    assert min(sum(abs(a - b) for a, b in zip(colours[i], colours[i + 1])) for i in range(49)) > 60
