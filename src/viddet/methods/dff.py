"""DFF, Deep Feature Flow (Zhu et al., CVPR 2017, §3); MMTracking ``mmtrack/models/vid/dff.py``.

Per frame t with key frame k = t - t % interval:
  t == k: feats_k = backbone+neck(frame_k) (cached with the key image);
  else:   flow = FlowNet(frame_t, frame_k); feats_t = warp(feats_k, flow)  (no backbone);
then RPN + RoI head on feats_t. Causal, so offline and online modes are the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from viddet.methods.base import MethodSettings, at_least
from viddet.methods.faster_rcnn import FasterRCNNMethod
from viddet.models.flownet import FlowNetSimple
from viddet.models.warp import flow_warp_feats, warp_feats
from viddet.models.losses import DetectorTrainConfig
from viddet.models.sampling import SamplerConfig
from viddet.structures import Detections


@dataclass
class DFFSettings(MethodSettings):
    """DFF's inference settings (MMTracking's ``test_cfg``)."""
    key_frame_interval: int = field(default=10, metadata={'help': 'DFF: the backbone runs on every N-th frame'})

    def __post_init__(self):
        at_least(self, 1, 'key_frame_interval')


class DFF(FasterRCNNMethod):
    """Attributes ``detector`` (:class:`FasterRCNN`) and ``motion`` (:class:`FlowNetSimple`).

    Args:
        key_frame_interval: a frame is a key frame iff ``index % key_frame_interval == 0`` (10).
    """

    name = 'dff'
    title = 'DFF'
    paper = 'Zhu et al., Deep Feature Flow for Video Recognition, CVPR 2017'
    default_checkpoint = 'dff_r50'
    signature = ('detector.backbone.', 'motion.')
    has_flownet = True
    train_num_refs = 1
    Settings = DFFSettings

    def __init__(self, detector, motion: FlowNetSimple, key_frame_interval: int = 10):
        super().__init__(detector)
        self.motion = motion
        if key_frame_interval < 1:
            raise ValueError(f'key_frame_interval must be >= 1, got {key_frame_interval}')
        self.key_frame_interval = key_frame_interval
        self._key = None  # (key image tensor (1,3,Hp,Wp), key features (1,512,h,w))

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, key_frame_interval: int = 10) -> 'DFF':
        return cls(cls.detector_for(backbone, num_classes), FlowNetSimple(), key_frame_interval)

    @classmethod
    def train_config(cls) -> DetectorTrainConfig:
        """MMTracking's DFF config proposes 1000 boxes per key frame and samples 512 RoIs
        (``configs/vid/dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py``)."""
        return DetectorTrainConfig(rpn_proposal_max_per_img=1000, rcnn_sampler=SamplerConfig(512, 0.25, True))

    def reset(self):
        """Forgets the key frame (a new video starts with one)."""
        self._key = None

    def predict(self, frame, ctx) -> Detections:
        """On a key frame (index a multiple of ``key_frame_interval``, or the first frame) the
        backbone runs and its (1, 512, h, w) features become the key; otherwise FlowNet's flow from
        the key image to this frame warps the key features (no backbone). Causal, so identical in
        both modes (MMTracking ``DFF.simple_test``)."""
        if frame.index % self.key_frame_interval == 0 or self._key is None:
            with ctx.timer('backbone'):
                feats = self.detector.extract_feat(frame.img)
            self._key = (frame.img, feats)
        else:
            key_img, key_feats = self._key
            with ctx.timer('flow'):
                # = flow_warp_feats(key_feats, motion(...)), the flow made on the feature grid
                flow = self.motion.feature_flow(frame.img, key_img, frame.meta.img_shape, key_feats.shape[-2:])
                feats = warp_feats(key_feats, flow)
        return self.detector.detect(feats, frame.meta, ctx.timer)

    def losses(self, sample, cfg) -> dict:
        """MMTracking ``DFF.forward_train``: flow = FlowNet(key, ref); only the reference frame goes
        through the backbone; its features are warped to the key frame and the RPN / R-CNN losses
        use the key frame's ground truth. For still images (``is_video_data`` False) the features
        are ``0 * warped + ref_feats``, which keeps FlowNet in the graph (zero gradient) but uses
        the unwarped features."""
        ref = sample.ref_imgs[:1]
        flow = self.motion(sample.img[None], ref, sample.img_shape)
        ref_x = self.detector.extract_feat(ref)
        x = flow_warp_feats(ref_x, flow)
        if not sample.is_video_data:
            x = 0 * x + ref_x
        return self.single_frame_losses(sample, cfg, x)
