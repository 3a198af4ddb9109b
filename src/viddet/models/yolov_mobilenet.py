"""An ImageNet MobileNetV2 under YOLOX's PAFPN: a CPU-sized body for the YOLOV family (backbone name
``mobilenetv2``), for training on small data (``configs/mini_vid/yolov_mobilenetv2.yaml``). Not part
of the official YOLOV code, which has no such model; the neck and head are the YOLOV-S ones.

The body (:class:`MobileNetV2Body`) is torchvision's ``mobilenet_v2().features`` blocks 0..17 (Sandler
et al., "MobileNetV2", CVPR 2018, Table 2) with their strides unchanged — ``features.18`` (1 x 1 conv
320 -> 1280) and the classifier are not used — so the torchvision ImageNet weights
(``../shared/weights/mobilenet_v2_imagenet_features.pth``) load by name. Its three outputs, taken after
blocks 6, 13 and 17, are the stride-8 / 16 / 32 maps of 32 / 96 / 320 channels, which YOLOX's PAFPN
(:class:`viddet.models.yolov_backbones.TransformerPAFPN`, the same neck over another body's channels)
takes at the YOLOV-S multipliers (depth 0.33, width 0.5: outputs 128 / 256 / 512 channels).

The family's input is the official raw 0..255 BGR letterbox (:func:`viddet.models.yolox.letterbox`);
the body turns it into what the ImageNet weights expect (RGB, the ImageNet mean / std of
:mod:`viddet.data.transforms`) before its first block.

State-dict keys in a YOLOV model: ``backbone.backbone.features.<i>...`` (the body),
``backbone.lateral_conv0...`` (the neck), as the other bodies' (:func:`body_of_state` reads the
variant off them).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from viddet.data.transforms import IMG_MEAN_RGB, IMG_STD_RGB
from viddet.errors import VidDetError
from viddet.models.layers import FrozenStagesMixin
from viddet.models.mobilenet import load_torchvision_features
from viddet.models.yolov_backbones import TransformerPAFPN

NAME = 'mobilenetv2'
NUM_BLOCKS = 18
"""``features.0`` .. ``features.17``."""
OUTPUT_AFTER = (6, 13, 17)
"""The blocks whose outputs are the stride-8, 16 and 32 maps."""
CHANNELS = (32, 96, 320)
NECK_OUT = (256, 512, 1024)
"""The PAFPN's ``out_channels`` before ``width`` (YOLOX's)."""
DEPTH, WIDTH = 0.33, 0.5
"""The neck / head multipliers: YOLOV-S's."""
FIRST_KEY = 'backbone.backbone.features.0.0.weight'


class MobileNetV2Body(FrozenStagesMixin, nn.Module):
    """torchvision's MobileNetV2 ``features`` 0..17 with three outputs; raw BGR in.

    Args:
        frozen_stages: leading ``features`` blocks kept frozen (``requires_grad=False``, eval mode);
            0..18.
        norm_eval: every BatchNorm of the body in eval mode while training (ImageNet statistics: a
            YOLOV batch is a few frames of one video).

    Shapes: (B, 3, H, W) raw 0..255 BGR, H and W multiples of 32 -> (B, 32, H/8, W/8),
    (B, 96, H/16, W/16), (B, 320, H/32, W/32).
    """

    def __init__(self, frozen_stages: int = 0, norm_eval: bool = True):
        super().__init__()
        from torchvision.models import mobilenet_v2
        full = mobilenet_v2(weights=None).features
        self.features = nn.Sequential(*[full[i] for i in range(NUM_BLOCKS)])
        self.register_buffer('mean', torch.tensor(IMG_MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMG_STD_RGB).view(1, 3, 1, 1), persistent=False)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.freeze()

    def frozen_modules(self) -> List[nn.Module]:
        """The first ``frozen_stages`` feature blocks."""
        return [self.features[i] for i in range(min(max(self.frozen_stages, 0), NUM_BLOCKS))]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (x.flip(1) - self.mean) / self.std
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in OUTPUT_AFTER:
                outs.append(x)
        return tuple(outs)


def mobilenet_pafpn(frozen_stages: int = 0) -> TransformerPAFPN:
    """The body and YOLOX's PAFPN at the YOLOV-S multipliers (random weights; see
    :func:`imagenet_body_state` for the ImageNet ones).

    Shapes: (B, 3, H, W) -> (B, 128, H/8, W/8), (B, 256, H/16, W/16), (B, 512, H/32, W/32).
    """
    return TransformerPAFPN(MobileNetV2Body(frozen_stages), CHANNELS, NECK_OUT, DEPTH, WIDTH)


def is_mobilenet_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a YOLOV-family state dict has this body (``backbone.backbone.features.*``)."""
    return FIRST_KEY in state


def imagenet_body_state(state: Mapping[str, torch.Tensor], source: str = '<state dict>') -> Dict[str, torch.Tensor]:
    """torchvision ImageNet MobileNetV2 weights (``features.<i>...`` keys, with or without the
    ``features.`` prefix, or a whole ``mobilenet_v2()`` state dict; read as
    :func:`viddet.models.mobilenet.load_torchvision_features` reads them) under the YOLOV model's key
    names (``backbone.backbone.features.<i>...``, i < 18): what ``init.checkpoint`` loads into a
    ``mobilenetv2`` YOLOV / YOLOV++ (the rest of the model stays at its initialisation).

    Raises:
        VidDetError: naming ``source``: no MobileNetV2 weights in it, a block of the body missing,
            or a tensor of another shape.
    """
    body = MobileNetV2Body()
    missing, _ = load_torchvision_features(body, state, source)
    if missing:
        raise VidDetError(f'{source} lacks {len(missing)} of the {len(body.state_dict())} MobileNetV2 body '
                          f'tensors (first: {missing[0]}): not torchvision MobileNetV2 weights?')
    return {'backbone.backbone.' + k: v for k, v in body.state_dict().items()}
