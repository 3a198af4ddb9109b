"""FlowNetSimple, numerically as MMTracking 0.14 (DFF / FGFA motion branch); the warping of
features by its flow is in :mod:`viddet.models.warp`.

Sources:
    * MMTracking 0.14 ``mmtrack/models/motion/flownet_simple.py`` (``FlowNetSimple``).
    * FlowNet: Dosovitskiy et al., "FlowNet: Learning Optical Flow with Convolutional Networks",
      ICCV 2015, §3 (FlowNetSimple, refinement by up-convolution).

Parity traps reproduced on purpose (do not "fix" them; the checkpoints were trained with them):
    1. The input is built from the *detector-normalised* images: de-normalise with the ImageNet RGB
       mean/std, divide by 255, subtract (0.411, 0.432, 0.45) in RGB order (not the MXNet BGR pixel
       means), zero the padding region, then downsample 0.5x with bilinear ``align_corners=False``.
    2. The flow is predicted at stride 4 of the half-resolution input and brought back to the
       padded full resolution by bilinear x8 upsampling (``align_corners=False``), then multiplied
       by 8 and by 5 (x40 in total, in full-resolution pixels).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from viddet.data.transforms import IMG_MEAN_RGB, IMG_STD_RGB
from viddet.models.layers import ConvAct
from viddet.models.warp import resize_flow

__all__ = ['FlowNetSimple', 'FLOW_IMG_MEAN_RGB', 'FLOW_IMG_STD']

FLOW_IMG_MEAN_RGB = (0.411, 0.432, 0.45)
"""Mean subtracted from the [0, 1] RGB image before FlowNet (MMTracking ``flow_img_norm_mean``)."""
FLOW_IMG_STD = (255.0, 255.0, 255.0)
"""Divisor of the 0..255 RGB image before FlowNet (MMTracking ``flow_img_norm_std``)."""


def _crop_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keeps the top-left (H_target, W_target) window of ``x`` (MMTracking ``crop_like``)."""
    if x.shape[2:] == target.shape[2:]:
        return x
    return x[:, :, :target.shape[2], :target.shape[3]]


class FlowNetSimple(nn.Module):
    """FlowNetS as configured in MMTracking (``FlowNetSimple(img_scale_factor=0.5)``).

    Layers (state_dict keys are exactly MMTracking's ``motion.*`` keys without the prefix,
    registered in the same order):

    * encoder ``conv1.0`` 6->64 k7, ``conv2.0`` 64->128 k5, ``conv3.0`` 128->256 k5,
      ``conv3.1`` 256->256 k3, ``conv4.{0,1}`` ->512 k3, ``conv5.{0,1}`` ->512 k3,
      ``conv6.{0,1}`` ->1024 k3; ``.0`` has stride 2, ``.1`` stride 1; padding (k-1)/2; bias;
      LeakyReLU(0.1).
    * decoder, coarse to fine: ``deconv{5,4,3,2}`` (ConvTranspose k4 s2 p1, no bias,
      LeakyReLU(0.1)), ``predict_flow{6,5,4,3}`` and ``predict_flow`` (3x3, no bias, no activation),
      ``upsample_flow{5,4,3,2}`` (ConvTranspose 2->2 k4 s2 p1, no bias, no activation).

    Args:
        img_scale_factor: resize factor of the image pair before the network (0.5 in all configs).
        flow_scale_factor: extra multiplier of the output flow (5.0: FlowNet predicts flow/20).
        img_norm_mean, img_norm_std: RGB mean/std of the detector normalisation that
            :meth:`prepare_inputs` undoes (0..255 scale).
        flow_img_norm_mean, flow_img_norm_std: FlowNet's own RGB normalisation (x / std - mean).

    The normalisation constants are non-persistent buffers: they follow ``.to(device)`` but are not
    in the state_dict (MMTracking keeps them as plain attributes).
    """

    def __init__(self, img_scale_factor: float = 0.5, flow_scale_factor: float = 5.0,
                 img_norm_mean: Sequence[float] = IMG_MEAN_RGB,
                 img_norm_std: Sequence[float] = IMG_STD_RGB,
                 flow_img_norm_mean: Sequence[float] = FLOW_IMG_MEAN_RGB,
                 flow_img_norm_std: Sequence[float] = FLOW_IMG_STD):
        super().__init__()
        self.img_scale_factor = float(img_scale_factor)
        self.flow_scale_factor = float(flow_scale_factor)

        def leaky(cin, cout, k, stride):
            return ConvAct(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=True,
                           act='leaky_relu', negative_slope=0.1)

        # Encoder: (in, out, kernel) of each group; the first conv of a group has stride 2. The
        # second conv of group 3 has kernel 3 although the group's first conv has kernel 5.
        self.conv1 = nn.ModuleList([leaky(6, 64, 7, 2)])
        self.conv2 = nn.ModuleList([leaky(64, 128, 5, 2)])
        self.conv3 = nn.ModuleList([leaky(128, 256, 5, 2), leaky(256, 256, 3, 1)])
        self.conv4 = nn.ModuleList([leaky(256, 512, 3, 2), leaky(512, 512, 3, 1)])
        self.conv5 = nn.ModuleList([leaky(512, 512, 3, 2), leaky(512, 512, 3, 1)])
        self.conv6 = nn.ModuleList([leaky(512, 1024, 3, 2), leaky(1024, 1024, 3, 1)])

        # Decoder, registered coarse to fine like MMTracking (deconvK, predict_flow(K+1),
        # upsample_flowK), so that state_dict() lists the keys in the checkpoint's order.
        # Input channels of level K: conv_K channels + deconv output + 2 flow channels.
        for level, cin, cout in ((5, 1024, 512), (4, 1026, 256), (3, 770, 128), (2, 386, 64)):
            self.add_module(f'deconv{level}', ConvAct(cin, cout, 4, stride=2, padding=1, bias=False,
                                                      transposed=True, act='leaky_relu',
                                                      negative_slope=0.1))
            self.add_module(f'predict_flow{level + 1}',
                            ConvAct(cin, 2, 3, stride=1, padding=1, bias=False))
            self.add_module(f'upsample_flow{level}',
                            ConvAct(2, 2, 4, stride=2, padding=1, bias=False, transposed=True))
        self.predict_flow = ConvAct(128 + 64 + 2, 2, 3, stride=1, padding=1, bias=False)

        def buf(v):
            return torch.tensor([float(c) for c in v], dtype=torch.float32).view(1, 3, 1, 1)

        self.register_buffer('img_norm_mean', buf(img_norm_mean), persistent=False)
        self.register_buffer('img_norm_std', buf(img_norm_std), persistent=False)
        self.register_buffer('flow_img_norm_mean', buf(flow_img_norm_mean), persistent=False)
        self.register_buffer('flow_img_norm_std', buf(flow_img_norm_std), persistent=False)

    # ------------------------------------------------------------------------------------------
    def _prepare_half(self, imgs: torch.Tensor, img_shape: Tuple[int, int]) -> torch.Tensor:
        """(N, 3, Hp, Wp) detector-normalised RGB -> (N, 3, Hp*s, Wp*s) FlowNet input half."""
        x = imgs * self.img_norm_std.to(imgs.dtype) + self.img_norm_mean.to(imgs.dtype)
        x = x / self.flow_img_norm_std.to(imgs.dtype) - self.flow_img_norm_mean.to(imgs.dtype)
        h, w = int(img_shape[0]), int(img_shape[1])
        x[:, :, h:, :] = 0.0
        x[:, :, :, w:] = 0.0
        return F.interpolate(x, scale_factor=self.img_scale_factor, mode='bilinear',
                             align_corners=False)

    def prepare_image(self, imgs: torch.Tensor, img_shape: Tuple[int, int]) -> torch.Tensor:
        """One 3-channel half of :meth:`prepare_inputs`: FlowNet's renormalised, downsampled
        input of frames, which depends on nothing else (a frame that is a source for many target
        frames, as in FGFA's window, is prepared once: :meth:`feature_flow_prepared`).

        Args:
            imgs: (N, 3, Hp, Wp) detector-normalised images; img_shape: (h, w) as for
                :meth:`prepare_inputs`.

        Returns:
            (N, 3, round(Hp*s), round(Wp*s)) float.

        Raises:
            ValueError: if ``imgs`` is not (N, 3, H, W).
        """
        if imgs.dim() != 4 or imgs.shape[1] != 3:
            raise ValueError(f'FlowNetSimple.prepare_image expects (N, 3, H, W) images, got {tuple(imgs.shape)}')
        return self._prepare_half(imgs, img_shape)

    def prepare_inputs(self, target_imgs: torch.Tensor, source_imgs: torch.Tensor,
                       img_shape: Tuple[int, int]) -> torch.Tensor:
        """Builds FlowNet's 6-channel input from detector-normalised image pairs.

        MMTracking ``FlowNetSimple.prepare_imgs``. Every operation is per
        channel, so each 3-channel half is prepared separately (identical to preparing the
        concatenation) and a single target image is prepared once and broadcast.

        Args:
            target_imgs: (N, 3, Hp, Wp) or (1, 3, Hp, Wp) float; the current frame(s), normalised
                by the detector pipeline (RGB, (x - mean) / std, zero-padded bottom/right). A batch
                of 1 is paired with every source image.
            source_imgs: (N, 3, Hp, Wp) float; the reference/source frame(s), same normalisation.
            img_shape: (h, w) in pixels of the resized image before padding (MMTracking
                ``img_metas[0]['img_shape'][:2]``); rows >= h and columns >= w are set to 0 after
                FlowNet's own normalisation (i.e. they are 0, not the mean colour).

        Returns:
            (N, 6, round(Hp*s), round(Wp*s)) float, channels [target RGB, source RGB], each
            ``(x*std + mean) / 255 - (0.411, 0.432, 0.45)``, downsampled by ``s =
            img_scale_factor`` with bilinear ``align_corners=False`` (an exact 2x2 average for s=0.5
            and even sizes).

        Raises:
            ValueError: if the tensors are not (N, 3, Hp, Wp) with matching sizes.
        """
        if target_imgs.dim() != 4 or source_imgs.dim() != 4 or target_imgs.shape[1] != 3 \
                or source_imgs.shape[1] != 3:
            raise ValueError('FlowNetSimple.prepare_inputs expects (N, 3, H, W) target and source '
                             f'images, got {tuple(target_imgs.shape)} and {tuple(source_imgs.shape)}')
        if target_imgs.shape[2:] != source_imgs.shape[2:]:
            raise ValueError('target and source images differ in size: '
                             f'{tuple(target_imgs.shape)} vs {tuple(source_imgs.shape)}')
        n = source_imgs.shape[0]
        if target_imgs.shape[0] not in (1, n):
            raise ValueError(f'{target_imgs.shape[0]} target images for {n} source images '
                             '(expected 1 or the same number)')
        tgt = self._prepare_half(target_imgs, img_shape)
        src = self._prepare_half(source_imgs, img_shape)
        return torch.cat((tgt.expand(n, -1, -1, -1), src), dim=1)

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the network on a prepared input (see :meth:`prepare_inputs`).

        Args:
            x: (N, 6, h, w) with h, w the half-resolution sizes.

        Returns:
            (N, 2, H', W') flow in full-resolution pixels: the raw prediction, at stride 4 of the
            half-resolution input (size ceil(h/4) x ceil(w/4)), is upsampled by
            ``u = 4 / img_scale_factor`` (bilinear, ``align_corners=False``), so H' = u*ceil(h/4),
            then multiplied by u and by ``flow_scale_factor`` (x8, x8, x5 = x40 for the MMTracking
            config). Channel 0 is the horizontal (x) displacement, channel 1 the vertical (y) one.
            When the padded image sizes Hp, Wp are multiples of 16 (h = Hp/2), H', W' = Hp, Wp.
        """
        outs = []
        for group in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6):
            for m in group:
                x = m(x)
            outs.append(x)
        # outs[1..5] = conv2..conv6 outputs (MMTracking out_indices [2, 3, 4, 5, 6]).
        concat = outs[5]
        for level in (5, 4, 3, 2):
            skip = outs[level - 1]  # conv{level} output
            flow = getattr(self, f'predict_flow{level + 1}')(concat)
            upflow = _crop_like(getattr(self, f'upsample_flow{level}')(flow), skip)
            deconv = _crop_like(getattr(self, f'deconv{level}')(concat), skip)
            concat = torch.cat((skip, deconv, upflow), dim=1)
        flow = self.predict_flow(concat)
        up = 4 / self.img_scale_factor
        flow = F.interpolate(flow, scale_factor=up, mode='bilinear', align_corners=False)
        flow = flow * up
        flow = flow * self.flow_scale_factor
        return flow

    def forward(self, target_imgs: torch.Tensor, source_imgs: torch.Tensor,
                img_shape: Tuple[int, int], chunk_size: Optional[int] = None) -> torch.Tensor:
        """Flow from each target image to its source image (MMTracking ``FlowNetSimple.forward``).

        Args:
            target_imgs: (N, 3, Hp, Wp) or (1, 3, Hp, Wp), detector-normalised (see
                :meth:`prepare_inputs`). MMTracking puts the target (current / key) frame first in
                the 6-channel pair.
            source_imgs: (N, 3, Hp, Wp), detector-normalised reference frames.
            img_shape: (h, w) unpadded resized image size in pixels.
            chunk_size: if given, at most this many pairs go through the network at once (bounds
                the activation memory, a few tens of MB per pair at 1008x608 in float32 without
                autograd); results are the same up to float summation order.

        Returns:
            (N, 2, Hp, Wp) float flow in full-resolution padded-image pixels (Hp, Wp multiples of
            16). Feeding it to :func:`viddet.models.warp.flow_warp_feats` with the source frame's
            features warps them to the target frame: target pixel p reads source position p + flow(p).
        """
        x = self.prepare_inputs(target_imgs, source_imgs, img_shape)
        if chunk_size is None or chunk_size >= x.shape[0]:
            return self.forward_prepared(x)
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
        return torch.cat([self.forward_prepared(c) for c in x.split(chunk_size, dim=0)], dim=0)

    def forward_features(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """:meth:`forward_prepared` resized to a feature grid: ``resize_flow(forward_prepared(x),
        feat_size)``, what :func:`viddet.models.warp.flow_warp_feats` computes first (its step 1).

        Args:
            x: (N, 6, h, w) prepared pairs (:meth:`prepare_inputs`).
            feat_size: (H, W) of the feature maps to warp (Hp/16, Wp/16 in the pipeline).

        Returns:
            (N, 2, H, W) flow in feature cells, for :func:`viddet.models.warp.warp_feats`.
        """
        return resize_flow(self.forward_prepared(x), feat_size)

    def feature_flow(self, target_imgs: torch.Tensor, source_imgs: torch.Tensor, img_shape: Tuple[int, int],
                     feat_size: Tuple[int, int], chunk_size: Optional[int] = None) -> torch.Tensor:
        """:meth:`forward` resized to the feature grid, for :func:`viddet.models.warp.warp_feats`:
        ``warp_feats(feats, feature_flow(...)) == flow_warp_feats(feats, forward(...))``. Inference
        (DFF, FGFA) needs nothing else of the flow, and the fast module
        (``viddet.speedups.flownet.FastFlowNetSimple``) then never makes the full-resolution flow.

        Args:
            target_imgs, source_imgs, img_shape, chunk_size: as for :meth:`forward`.
            feat_size: (H, W) of the source frames' feature maps.

        Returns:
            (N, 2, H, W) flow in feature cells (channel 0 = x).
        """
        x = self.prepare_inputs(target_imgs, source_imgs, img_shape)
        if chunk_size is None or chunk_size >= x.shape[0]:
            return self.forward_features(x, feat_size)
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
        return torch.cat([self.forward_features(c, feat_size) for c in x.split(chunk_size, dim=0)], dim=0)


    def feature_flow_prepared(self, target: torch.Tensor, sources: Sequence[torch.Tensor],
                              feat_size: Tuple[int, int], chunk_size: Optional[int] = None) -> torch.Tensor:
        """:meth:`feature_flow` from prepared images (:meth:`prepare_image`): the flow from one
        target frame to each source frame on the feature grid. The 6-channel pairs are assembled
        chunk by chunk (channels-last), so at most ``chunk_size`` of them exist at once.

        Args:
            target: (1, 3, h, w) prepared target (current) frame.
            sources: N prepared source frames, each (1, 3, h, w) (or an (N, 3, h, w) tensor).
            feat_size: (H, W) of the source frames' feature maps.
            chunk_size: at most this many pairs through the network at once (None: all).

        Returns:
            (N, 2, H, W) flow in feature cells, as :meth:`feature_flow` of the unprepared images.

        Raises:
            ValueError: on no sources, a size mismatch or a chunk size below 1.
        """
        sources = list(sources.split(1)) if isinstance(sources, torch.Tensor) else list(sources)
        if not sources or target.dim() != 4 or target.shape[:2] != (1, 3) \
                or any(s.shape != target.shape for s in sources):
            raise ValueError('feature_flow_prepared expects a (1, 3, h, w) target and sources of its shape, got '
                             f'{tuple(target.shape)} and {[tuple(s.shape) for s in sources[:3]]}')
        chunk = len(sources) if chunk_size is None else chunk_size
        if chunk < 1:
            raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
        h, w = target.shape[-2:]
        flows = []
        for lo in range(0, len(sources), chunk):
            part = sources[lo:lo + chunk]
            x = target.new_empty(len(part), h, w, 6).permute(0, 3, 1, 2)   # (n, 6, h, w) channels-last
            x[:, :3] = target
            for j, src in enumerate(part):
                x[j, 3:] = src[0]
            flows.append(self.forward_features(x, feat_size))
        return flows[0] if len(flows) == 1 else torch.cat(flows)
