"""Per-method training forwards follow MMTracking's forward_train (``mmtrack/models/vid/{dff,fgfa,selsa}.py``)."""
import numpy as np
import pytest
import torch

from viddet.methods import build_method
from viddet.structures import TrainSample
from viddet.models.losses import sum_losses
from viddet.structures import ImageMeta

pytestmark = pytest.mark.usefixtures('one_thread')
H, W = 96, 128


def _sample(num_refs, video=True, seed=3):
    g = torch.Generator().manual_seed(0)
    meta = ImageMeta((H, W), (H, W), (H, W), np.ones(4, np.float32))
    return TrainSample(torch.randn(3, H, W, generator=g), torch.randn(num_refs, 3, H, W, generator=g),
                       [meta] * (1 + num_refs), torch.tensor([[10.0, 12.0, 90.0, 80.0]]), torch.tensor([4]),
                       is_video_data=video, seed=seed)


def _small(model):
    cfg = model.train_config()
    cfg.rpn_proposal_max_per_img, cfg.rcnn_sampler.num = 60, 24
    model.train_cfg = cfg
    return model.train()


def test_dff_still_images_use_unwarped_ref_features():
    """DET samples: x = 0 * warped + ref_feats, i.e. the single-frame losses on the reference image,
    with FlowNet still in the graph (zero gradient)."""
    torch.manual_seed(0)
    dff = _small(build_method('dff', 'mobilenetv2', 30))
    single = _small(build_method('single', 'mobilenetv2', 30))
    single.detector.load_state_dict(dff.detector.state_dict())
    s = _sample(1, video=False)
    ref_as_key = TrainSample(s.ref_imgs[0], s.ref_imgs[:0], s.metas[:1], s.gt_bboxes, s.gt_labels, seed=s.seed)
    ld, ls = dff.forward_train([s]), single.forward_train([ref_as_key])
    for k in ld:
        assert ld[k].item() == pytest.approx(ls[k].item(), rel=1e-5, abs=1e-6), k
    sum_losses(ld).backward()
    g = dff.motion.conv1[0].conv.weight.grad
    assert g is not None and g.abs().max() == 0
    # video samples do warp: different losses, FlowNet gets a gradient
    dff.zero_grad()
    lv = dff.forward_train([_sample(1, video=True)])
    sum_losses(lv).backward()
    assert dff.motion.conv1[0].conv.weight.grad.abs().max() > 0


def test_dff_extracts_features_of_the_reference_only():
    dff = _small(build_method('dff', 'mobilenetv2', 30))
    seen = []
    orig = dff.detector.extract_feat
    dff.detector.extract_feat = lambda imgs: seen.append(imgs.clone()) or orig(imgs)
    s = _sample(1)
    dff.forward_train([s])
    assert len(seen) == 1 and torch.equal(seen[0], s.ref_imgs[:1])


def test_fgfa_aggregates_only_warped_references():
    fgfa = _small(build_method('fgfa', 'mobilenetv2', 30))
    calls = []
    orig = fgfa.aggregator.forward
    fgfa.aggregator.forward = lambda x, ref_x: calls.append((x.shape[0], ref_x.shape[0])) or orig(x, ref_x)
    flows = []
    orig_motion = fgfa.motion.forward
    fgfa.motion.forward = lambda t, s, shape, chunk_size=None: flows.append((t.shape[0], s.shape[0])) or \
        orig_motion(t, s, shape, chunk_size)
    losses = fgfa.forward_train([_sample(2)])
    assert calls == [(1, 2)]          # key as query, the 2 warped references as the set (no key)
    assert flows == [(1, 2)]          # FlowNet(key, ref_i) for each reference
    assert all(torch.isfinite(v) for v in losses.values())
    fgfa.forward_train([_sample(1)])  # a video boundary leaves one reference
    assert calls[-1] == (1, 1)


@pytest.mark.parametrize('method', ['selsa', 'troi'])
def test_selsa_reference_proposals_use_the_test_rpn_without_gradient(method):
    model = _small(build_method(method, 'mobilenetv2', 30))
    rpn_calls = []
    orig = model.detector.rpn_head.proposals_from_outputs

    def spy(cls, reg, shapes, cfg):
        out = orig(cls, reg, shapes, cfg)
        rpn_calls.append((cls.shape[0], cfg.max_per_img, cls.requires_grad, [o.shape[0] for o in out]))
        return out
    model.detector.rpn_head.proposals_from_outputs = spy
    head_in = []
    orig_head = model.detector.roi_head.bbox_head.forward
    model.detector.roi_head.bbox_head.forward = lambda x, ref_x=None: head_in.append((x.shape[0], ref_x.shape[0])) or \
        orig_head(x, ref_x)
    losses = model.forward_train([_sample(2)])
    key_call, ref_call = rpn_calls
    assert key_call[0] == 1 and key_call[1] == 60 and key_call[2]       # key: training proposals, in the graph
    assert ref_call[0] == 2 and ref_call[1] == 300 and not ref_call[2]  # refs: test cfg (300), no gradient
    assert head_in == [(24, sum(ref_call[3]))]   # 24 sampled key RoIs attend to every reference RoI
    sum_losses(losses).backward()
    assert model.detector.roi_head.bbox_head.aggregator[0].fc_embed.weight.grad.abs().max() > 0
    if method == 'troi':
        assert model.detector.roi_head.bbox_roi_extractor.embed_network.conv.weight.grad.abs().max() > 0


def test_forward_train_averages_samples():
    m = _small(build_method('single', 'mobilenetv2', 30))
    a, b = _sample(0, seed=1), _sample(0, seed=2)
    b = TrainSample(-a.img, a.ref_imgs, a.metas, a.gt_bboxes, a.gt_labels, seed=2)
    la, lb, lab = m.forward_train([a]), m.forward_train([b]), m.forward_train([a, b])
    for k in la:
        assert lab[k].item() == pytest.approx((la[k].item() + lb[k].item()) / 2, rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match='at least 1 reference'):
        _small(build_method('selsa', 'mobilenetv2', 30)).forward_train([a])


def test_zero_flownet_option_gives_zero_flow_and_frozen_flownet():
    from viddet.config.training import config_from_dict
    from viddet.engine.initial_weights import build_train_model
    cfg = config_from_dict({'model': {'method': 'fgfa', 'backbone': 'mobilenetv2', 'flownet': 'zero'},
                            'data': {'train': [{'ann_file': 'a.json', 'img_prefix': 'b',
                                                'ref_sampler': {'num_ref_imgs': 2}}]}})
    m = build_train_model(cfg)
    s = _sample(2)
    flow = m.motion(s.img[None], s.ref_imgs, s.img_shape)
    assert flow.abs().max() == 0
    assert not any(p.requires_grad for p in m.motion.parameters())
    from viddet import VidDetError
    with pytest.raises(VidDetError, match='has no FlowNet'):
        config_from_dict({'model': {'method': 'single', 'flownet': 'zero'}})
