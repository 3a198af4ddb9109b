"""Backbone / FlowNet initialisation for training and the MobileNetV2-lite backbone."""
import pytest
import torch
import torchvision

from viddet import VidDetError
from viddet.engine.initial_weights import load_backbone_weights, load_flownet_weights
from viddet.methods import build_method
from viddet.models.mobilenet import MobileNetV2Lite, load_torchvision_features

pytestmark = pytest.mark.usefixtures('one_thread')


def test_mobilenet_lite_stride16_dilated_and_frozen():
    m = MobileNetV2Lite()
    assert m.out_channels == 320
    m.train()
    y = m(torch.randn(1, 3, 100, 150))
    assert y.shape == (1, 320, 7, 10)   # ceil(100/16), ceil(150/16)
    for i in (14, 15, 16, 17):
        dw = [c for c in m.features[i].modules() if isinstance(c, torch.nn.Conv2d) and c.groups > 1][0]
        assert dw.stride == (1, 1) and dw.dilation == (2, 2) and dw.padding == (2, 2)
    assert all(not p.requires_grad for i in range(4) for p in m.features[i].parameters())
    assert all(p.requires_grad for p in m.features[4].parameters())
    assert all(not b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))   # norm_eval


def test_mobilenet_lite_loads_torchvision_features_and_matches_it_to_stride_16(shared):
    path = shared('weights', 'mobilenet_v2_imagenet_features.pth')
    state = torch.load(path, weights_only=True)
    assert len(state) == 312
    m = MobileNetV2Lite()
    missing, unused = load_torchvision_features(m, state, str(path))
    assert missing == [] and sorted(unused) == sorted(k for k in state if k.startswith('features.18.'))
    tv = torchvision.models.mobilenet_v2().features
    tv.load_state_dict({k[len('features.'):]: v for k, v in state.items()})
    tv.eval(), m.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(tv[:14](x), m.features[:14](x), atol=1e-5)   # identical up to the dilated stage


def test_resnet_backbone_weights_from_torchvision_file(tmp_path):
    tv = torchvision.models.resnet50()
    path = tmp_path / 'resnet50.pth'
    torch.save(tv.state_dict(), path)
    model = build_method('single', 'r50', 30)
    missing, unused = load_backbone_weights(model, str(path))
    assert missing == [] and sorted(unused) == ['fc.bias', 'fc.weight']
    for k, v in model.detector.backbone.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    # mmdet-style prefix works too
    torch.save({'state_dict': {'backbone.' + k: v for k, v in tv.state_dict().items()}}, tmp_path / 'mm.pth')
    assert load_backbone_weights(model, str(tmp_path / 'mm.pth'))[0] == []
    # a ResNet-18 file: first mismatched tensor named with both shapes
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(VidDetError, match=r'r18.pth: layer1.0.conv1.weight has shape \(64, 64, 3, 3\)'):
        load_backbone_weights(model, str(tmp_path / 'r18.pth'))
    torch.save({'foo': torch.zeros(1)}, tmp_path / 'junk.pth')
    with pytest.raises(VidDetError, match='contains no weight of this ResNetDC5'):
        load_backbone_weights(model, str(tmp_path / 'junk.pth'))
    with pytest.raises(VidDetError, match='does not exist'):
        load_backbone_weights(model, str(tmp_path / 'nope.pth'))


def test_flownet_weights_with_or_without_motion_prefix(tmp_path):
    a = build_method('dff', 'mobilenetv2', 30)
    b = build_method('dff', 'mobilenetv2', 30)
    torch.save({'state_dict': {'motion.' + k: v for k, v in a.motion.state_dict().items()}}, tmp_path / 'p.pth')
    load_flownet_weights(b, str(tmp_path / 'p.pth'))
    assert all(torch.equal(v, b.motion.state_dict()[k]) for k, v in a.motion.state_dict().items())
    c = build_method('fgfa', 'mobilenetv2', 30)
    torch.save(a.motion.state_dict(), tmp_path / 'bare.pth')
    load_flownet_weights(c, str(tmp_path / 'bare.pth'))
    assert torch.equal(c.motion.conv1[0].conv.weight, a.motion.conv1[0].conv.weight)
    torch.save({k: v for k, v in list(a.motion.state_dict().items())[2:]}, tmp_path / 'part.pth')
    with pytest.raises(VidDetError, match='missing keys: conv1.0.conv.weight'):
        load_flownet_weights(c, str(tmp_path / 'part.pth'))
    with pytest.raises(VidDetError, match='has no FlowNet'):
        load_flownet_weights(build_method('single', 'mobilenetv2', 30), str(tmp_path / 'bare.pth'))


def test_mmdet_style_head_init():
    torch.manual_seed(0)
    m = build_method('troi', 'mobilenetv2', 30).init_weights()
    head = m.detector.roi_head.bbox_head
    assert abs(head.fc_cls.weight.std().item() - 0.01) < 0.001 and head.fc_cls.bias.abs().max() == 0
    assert abs(head.fc_reg.weight.std().item() - 0.001) < 0.0001
    bound = (6 / (25088 + 1024)) ** 0.5   # Xavier uniform
    w = head.shared_fcs[0].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(m.detector.rpn_head.rpn_cls.weight.std().item() - 0.01) < 0.002
    emb = m.detector.roi_head.bbox_roi_extractor.embed_network.conv.weight
    assert abs(emb.std().item() - (2 / (512 * 9)) ** 0.5) < 0.002    # Kaiming fan_out
