"""MobileNetV2-lite: a CPU-friendly stride-16 backbone for the DC5 detector heads.

Not part of MMTracking: it exists so that small real models can be trained and tested on a CPU
(e.g. on ``mini_vid``). Everything downstream (ChannelMapper -> 512 channels, RPN, RoI head,
FlowNet warping, aggregators) is unchanged.

Construction (Sandler et al., "MobileNetV2", CVPR 2018, Table 2; torchvision's
``mobilenet_v2().features`` module layout, so torchvision-format weights load by name):

* ``features.0`` .. ``features.17``: the stem conv (stride 2) and the 17 inverted-residual
  blocks. torchvision's ``features.18`` (1x1 conv 320 -> 1280) is dropped: the 320-channel map
  goes straight to the neck (a 3x3 ChannelMapper 320 -> 512), which is ~4x cheaper than mapping
  1280 channels.
* Output stride 16 instead of 32, the "DC5" idea applied to MobileNetV2: block 14 (the last
  stride-2 block) gets stride 1, and the 3x3 depthwise convs of blocks 14-17 get dilation 2
  (padding 2), every block of the dilated stage including its first, like mmdet's dilated ResNet.
* ``frozen_stages=4``: ``features.0-3`` (everything up to stride 4, the analogue of ResNet's stem +
  layer1) get ``requires_grad=False`` and stay in eval mode; ``norm_eval``: every BatchNorm uses
  its running statistics while training.

Input: (N, 3, H, W) normalised RGB as produced by :mod:`viddet.data.transforms` — the ImageNet
mean/std on 0..255 values, identical to torchvision's [0, 1] mean (0.485, 0.456, 0.406) /
std (0.229, 0.224, 0.225). Output: (N, 320, ceil(H/16), ceil(W/16)).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from viddet.errors import VidDetError
from viddet.models.layers import FrozenStagesMixin

DILATED_BLOCKS = (14, 15, 16, 17)
NUM_FEATURES = 18  # features.0 .. features.17


class MobileNetV2Lite(FrozenStagesMixin, nn.Module):
    """Dilated MobileNetV2 feature extractor, output stride 16, 320 channels.

    Args:
        frozen_stages: number of leading ``features`` modules frozen (4 = up to stride 4; 0 = none).
        norm_eval: keep every BatchNorm in eval mode while training.

    State-dict keys: ``features.<i>...`` exactly as torchvision's ``mobilenet_v2().features``
    (i < 18); see :func:`load_torchvision_features`.
    """

    out_channels = 320
    stride = 16

    def __init__(self, frozen_stages: int = 4, norm_eval: bool = True):
        super().__init__()
        from torchvision.models import mobilenet_v2
        full = mobilenet_v2(weights=None).features
        self.features = nn.Sequential(*[full[i] for i in range(NUM_FEATURES)])
        for i in DILATED_BLOCKS:
            for m in self.features[i].modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == m.in_channels:
                    m.stride, m.dilation, m.padding = (1, 1), (2, 2), (2, 2)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.freeze()

    def frozen_modules(self) -> List[nn.Module]:
        """The first ``frozen_stages`` feature blocks."""
        return [self.features[i] for i in range(min(max(self.frozen_stages, 0), NUM_FEATURES))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 320, ceil(H/16), ceil(W/16))."""
        return self.features(x)


def load_torchvision_features(model: MobileNetV2Lite, state: Dict[str, torch.Tensor],
                              source: str = '<state dict>') -> Tuple[List[str], List[str]]:
    """Loads torchvision MobileNetV2 weights (``features.*`` keys, with or without the
    ``features.`` prefix, or a full ``mobilenet_v2()`` state dict with ``classifier.*``) into
    ``model``.

    Keys of ``features.18`` and the classifier are not used by the lite backbone and are skipped.

    Returns:
        (missing keys of the model, unused keys of the file).

    Raises:
        VidDetError: a shape mismatch, or no ``features`` key at all (naming ``source``).
    """
    own = model.state_dict()
    mapped = {}
    unused = []
    for k, v in state.items():
        key = k if k.startswith('features.') else 'features.' + k
        if key in own:
            if tuple(v.shape) != tuple(own[key].shape):
                raise VidDetError(f'{source}: {k} has shape {tuple(v.shape)}, the MobileNetV2-lite '
                                  f'backbone expects {tuple(own[key].shape)}')
            mapped[key] = v
        else:
            unused.append(k)
    if not mapped:
        raise VidDetError(f'{source} holds no torchvision MobileNetV2 feature weights '
                          f'(keys like features.0.0.weight); first keys: {list(state)[:5]}')
    missing = [k for k in own if k not in mapped]
    model.load_state_dict(mapped, strict=False)
    return missing, unused
