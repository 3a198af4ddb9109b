"""The MMTracking VID model zoo and the initial weights of training, by name -> published URL."""
from __future__ import annotations

from typing import Dict

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




def zoo_url(name: str) -> str:
    """Published URL of a model-zoo name (``$VIDDET_ZOO_BASE`` overrides the server, for mirrors)."""
    return zoo_base(ZOO_BASE).rstrip('/') + '/' + MODEL_ZOO[name]


def init_weights_url(name: str) -> str:
    """Published URL of an :data:`INIT_WEIGHTS` name; ``$VIDDET_WEIGHTS_BASE`` (a mirror holding the
    files side by side) replaces everything before the file name."""
    url = INIT_WEIGHTS[name]
    base = weights_base()
    return base.rstrip('/') + '/' + url.split('/')[-1] if base else url
