"""The model zoo and the initial weights of training, by name -> published URL: MMTracking's VID
checkpoints (:data:`MODEL_ZOO`), the YOLOV / YOLOV++ authors' released weights (:data:`YOLOV_ZOO`)
and the initial weights of MMTracking's configs (:data:`INIT_WEIGHTS`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

from viddet.runtime import weights_base, zoo_base

ZOO_BASE = 'https://download.openmmlab.com/mmtracking/'

# name -> path under ZOO_BASE (MMTracking 0.14's configs/vid/*/README.md model-zoo tables).
MODEL_ZOO: Dict[str, str] = {}
for _name, _dir, _stamp in [
    ('dff_r50', 'dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid', '20201227_213250-548911a4'),
    ('dff_r101', 'dff/dff_faster_rcnn_r101_dc5_1x_imagenetvid', '20201218_172720-ad732e17'),
    ('dff_x101', 'dff/dff_faster_rcnn_x101_dc5_1x_imagenetvid', '20210819_095932-0a9e6cb5'),
    ('fgfa_r50', 'fgfa/fgfa_faster_rcnn_r50_dc5_1x_imagenetvid', '20201228_022657-f42016f3'),
    ('fgfa_r101', 'fgfa/fgfa_faster_rcnn_r101_dc5_1x_imagenetvid', '20201219_011831-9c9d8183'),
    ('fgfa_x101', 'fgfa/fgfa_faster_rcnn_x101_dc5_1x_imagenetvid', '20210818_223334-8723c594'),
    ('selsa_r50', 'selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid', '20201227_204835-2f5a4952'),
    ('selsa_r101', 'selsa/selsa_faster_rcnn_r101_dc5_1x_imagenetvid', '20201218_172724-aa961bcc'),
    ('selsa_x101', 'selsa/selsa_faster_rcnn_x101_dc5_1x_imagenetvid', '20210825_205641-10252965'),
    ('troi_r50', 'temporal_roi_align/selsa_troialign_faster_rcnn_r50_dc5_7e_imagenetvid', '20210820_162714-939fd657'),
    ('troi_r101', 'temporal_roi_align/selsa_troialign_faster_rcnn_r101_dc5_7e_imagenetvid', '20210822_111621-22cb96b9'),
    ('troi_x101', 'temporal_roi_align/selsa_troialign_faster_rcnn_x101_dc5_7e_imagenetvid', '20210822_164036-4471ac42'),
]:
    MODEL_ZOO[_name] = f'vid/{_dir}/{_dir.split("/")[-1]}_{_stamp}.pth'
MODEL_ZOO['selsa_r50_fp16'] = 'fp16/selsa_faster_rcnn_r50_dc5_fp16_1x_imagenetvid_20210728_193846-dce6eb09.pth'

# Initial weights of training, by the names MMTracking 0.14's configs give them: the backbones'
# ``init_cfg=dict(type='Pretrained', checkpoint=...)`` (torchvision's ImageNet ResNets as mmcv
# resolves ``torchvision://``; ``open-mmlab://`` from mmcv/model_zoo/open_mmlab.json) and DFF/FGFA's
# ``motion.init_cfg`` (configs/vid/dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py).
INIT_WEIGHTS: Dict[str, str] = {
    'torchvision://resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'torchvision://resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'open-mmlab://resnext101_64x4d':
        'https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth',
    'flownet_simple': ZOO_BASE + 'pretrained_weights/flownet_simple.pth',
}



@dataclass(frozen=True)
class ReleasedWeights:
    """A weight file the YOLOV / YOLOV++ authors released (github.com/YuHengsss/YOLOV, README at
    commit fe777cbe): Google Drive links, one Hugging Face file. Cached as ``<name>.pth``.

    Attributes:
        method: the viddet method that loads it (``yolov``, ``yolovpp``); None for a still-image
            YOLOX base fine-tuned on VID (the starting point of the video models' training).
        backbone: ``yolox_s`` / ``yolox_l`` / ``yolox_x`` (CSPDarknet), ``swin_tiny``, ``swin_base``
            or ``focal_large`` (FocalNet-L).
        url: the published link: a Google Drive file (or folder) page, or a Hugging Face file.
        ap50: the published ImageNet VID val AP50 (%).
        sha256: the file's SHA-256. None: not published (nobody has downloaded the files for viddet
            yet); the digest of the first copy is then recorded beside it and checked on every later use.
    """
    method: Optional[str]
    backbone: str
    url: str
    ap50: float
    sha256: Optional[str] = None

    @property
    def drive_id(self) -> Optional[str]:
        """The Google Drive file id of a ``drive.google.com/file/d/<id>/...`` link (None otherwise)."""
        m = re.search(r'drive\.google\.com/file/d/([\w-]+)', self.url)
        return m.group(1) if m else None

    @property
    def is_folder(self) -> bool:
        """A Google Drive folder link (no single file to download)."""
        return 'drive.google.com/drive/folders/' in self.url


def _drive(file_id: str) -> str:
    return f'https://drive.google.com/file/d/{file_id}/view'


# The official README's tables (VID val AP50); which exp file a YOLOV++ weight belongs to is not stated
# there: by size, s / l / SwinTiny / SwinBase / FocalLarge match v++_{base,large,SwinTiny,SwinBaseX,
# FocalLarge}_decoupleReg.py. FocalLarge's weights column links a Google Drive file
# (11WT_GcZU7HHjWV4i9KoXHhh70zneraEE); its row also links V++_FocalL.pth on Hugging Face, used here.
YOLOV_ZOO: Dict[str, ReleasedWeights] = {
    'yolov_s': ReleasedWeights('yolov', 'yolox_s', _drive('12X4dQw45aXVYgJjKAAAPk409FO3xValW'), 77.3),
    'yolov_l': ReleasedWeights('yolov', 'yolox_l', _drive('1qZ-3iPDlYx1OKe6zz_-n42ceijo_Ntx6'), 83.6),
    'yolov_x': ReleasedWeights('yolov', 'yolox_x', _drive('1OIozS-D9wbWA9pDFl5xoFw6XqEcYtzsJ'), 85.5),
    'yolovpp_s': ReleasedWeights('yolovpp', 'yolox_s', _drive('1vlFlwyoRoo_qS2CkfTZE5iQ32MDoA1n4'), 78.7),
    'yolovpp_l': ReleasedWeights('yolovpp', 'yolox_l', _drive('1qb_abseRfOmRr8IiOuUSAlCUrBvUhdim'), 84.2),
    'yolovpp_swintiny': ReleasedWeights('yolovpp', 'swin_tiny', _drive('1pCIWAK6cy-BHhDVywmPb1LuuQHzNXdT2'), 85.6),
    'yolovpp_swinbase': ReleasedWeights('yolovpp', 'swin_base', _drive('1RGb499EBcSQjWDxu6KkvN4Tr1wSc6SHb'), 90.7),
    'yolovpp_focallarge': ReleasedWeights(
        'yolovpp', 'focal_large', 'https://huggingface.co/YuhengSSS/YOLOV/resolve/main/V%2B%2B_FocalL.pth', 92.9),
    # still-image YOLOX fine-tuned on VID: the video models' starting points
    'yolox_s_vid': ReleasedWeights(None, 'yolox_s', _drive('1n8wkByqpHdrGy6z9fsoZpBtTa0I3JOcG'), 69.5),
    'yolox_l_vid': ReleasedWeights(None, 'yolox_l', _drive('1rikaPCAHBBIugYUZYV1buyOIRG8xvGKB'), 76.1),
    'yolox_x_vid': ReleasedWeights(None, 'yolox_x', _drive('1OH3hGj7RMfcinMKPESbfI7C5y_RrA3aF'), 77.8),
    'yolox_swintiny_vid': ReleasedWeights(None, 'swin_tiny', _drive('1s1gKLXMX5Hwxkx7e9nZyzJ1oF9iPvEe1'), 79.2),
    'yolox_swinbase_vid': ReleasedWeights(
        None, 'swin_base', 'https://drive.google.com/drive/folders/1K5897iM2zzN4kcj8qdK3z_FtvW9f3kHN', 86.5),
}


def zoo_url(name: str) -> str:
    """Published URL of a model-zoo name (``$VIDDET_ZOO_BASE`` overrides the server, for mirrors)."""
    return zoo_base(ZOO_BASE).rstrip('/') + '/' + MODEL_ZOO[name]


def init_weights_url(name: str) -> str:
    """Published URL of an :data:`INIT_WEIGHTS` name; ``$VIDDET_WEIGHTS_BASE`` (a mirror holding the
    files side by side) replaces everything before the file name."""
    url = INIT_WEIGHTS[name]
    base = weights_base()
    return base.rstrip('/') + '/' + url.split('/')[-1] if base else url
