"""A stand-in VID method with scripted detections (tests of linking through the API and the demo),
so that the linked ids are known by hand."""
import torch

from viddet import VID_CLASSES
from viddet.api import VideoDetector
from viddet.data.transforms import preprocess
from viddet.structures import Detections


class Scripted(torch.nn.Module):
    """Frame t holds, in this order: object A (class 0) at x = 10 + 5 t, scoring 0.9 on even and 0.7
    on odd frames; A', a duplicate of A shifted by 2 px scoring 0.3; object B (class 1) at
    x = 200 - 5 t scoring 0.8, missing in frame 2 (boxes in pixels; frames of at least 270 x 90)."""
    name = 'scripted'

    def reset(self):
        pass

    def prepare(self, image, scale):
        return preprocess(image, scale)

    def predict(self, frame, ctx):
        t = frame.index
        rows = [(10 + 5 * t, 10, 60 + 5 * t, 60, 0.9 if t % 2 == 0 else 0.7, 0),
                (12 + 5 * t, 12, 62 + 5 * t, 62, 0.3, 0)]
        if t != 2:
            rows.append((200 - 5 * t, 20, 260 - 5 * t, 80, 0.8, 1))
        a = torch.tensor(rows, dtype=torch.float64)
        return Detections(a[:, :4].float(), a[:, 4].float(), a[:, 5].long())


def scripted_detector() -> VideoDetector:
    return VideoDetector(Scripted(), VID_CLASSES, torch.device('cpu'), scale=(128, 96))


# online: A keeps 0, B keeps 1 across its missed frame, the duplicate A' (0.3 < start score 0.5) gets -1
ONLINE_IDS = [[0, -1, 1], [0, -1, 1], [0, -1], [0, -1, 1], [0, -1, 1], [0, -1, 1]]
# Seq-NMS: A one tube (0), rescored to its mean 0.8, A' suppressed; B split by its gap into the
# better tube 1 (frames 3-5, sum 2.4) and tube 2 (frames 0-1, sum 1.6)
SEQNMS_IDS = [[0, 2], [0, 2], [0], [0, 1], [0, 1], [0, 1]]
