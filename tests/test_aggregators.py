"""EmbedAggregator, SelsaAggregator and TemporalRoIAlign against independent numpy / loop versions."""
import numpy as np
import pytest
import torch

from viddet.models.aggregators import EmbedAggregator, SelsaAggregator, SelsaRefProjections
from viddet.models.temporal_roi_align import TemporalRoIAlign


def _np_conv3x3(x, w, b):
    """Zero-padded 3x3 convolution in numpy. x (N, C, H, W), w (O, C, 3, 3), b (O,)."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            out += np.einsum('nchw,oc->nohw', xp[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out


def _softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _params(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def _keys(shared, method, prefix):
    lines = shared('parity', 'keys', f'{method}_r50.txt').read_text().splitlines()
    out = []
    for line in lines:
        name, _, shape = line.partition(' ')
        if name.startswith(prefix):
            out.append((name[len(prefix):], tuple(int(s) for s in shape.split(',') if s)))
    return out


def _got(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ----------------------------------------------------------------------------------------------
# EmbedAggregator (FGFA)


def test_embed_aggregator_matches_numpy():
    torch.manual_seed(0)
    agg = EmbedAggregator(channels=6)
    x = torch.randn(1, 6, 3, 4)
    ref = torch.randn(5, 6, 3, 4)
    with torch.no_grad():
        out = agg(x, ref)
        w = agg.adaptive_weights(x, ref)
    p = _params(agg)
    wt, bs = p['embed_convs.0.conv.weight'], p['embed_convs.0.conv.bias']
    e = _np_conv3x3(x.double().numpy(), wt, bs)          # no activation after the last conv
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    er = _np_conv3x3(ref.double().numpy(), wt, bs)
    er /= np.linalg.norm(er, axis=1, keepdims=True)
    w_np = _softmax((er * e).sum(axis=1, keepdims=True), axis=0)
    out_np = (w_np * ref.double().numpy()).sum(axis=0, keepdims=True)
    assert w.shape == (5, 1, 3, 4) and out.shape == (1, 6, 3, 4)
    np.testing.assert_allclose(w.sum(dim=0).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), w_np, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), out_np, atol=1e-5)


def test_embed_aggregator_identical_refs_return_the_ref():
    torch.manual_seed(1)
    agg = EmbedAggregator(channels=4)
    ref = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        out = agg(torch.randn(1, 4, 3, 5), ref.expand(7, -1, -1, -1))
    torch.testing.assert_close(out, ref)


def test_embed_aggregator_has_no_epsilon():
    # MMTracking divides by the plain L2 norm: an all-zero embedding gives NaN (0 / 0).
    agg = EmbedAggregator(channels=4)
    with torch.no_grad():
        agg.embed_convs[0].conv.weight.zero_()
        agg.embed_convs[0].conv.bias.zero_()
        out = agg(torch.randn(1, 4, 2, 2), torch.randn(3, 4, 2, 2))
    assert torch.isnan(out).all()


def test_embed_aggregator_keys(shared):
    assert _got(EmbedAggregator(512)) == _keys(shared, 'fgfa', 'aggregator.')


# ----------------------------------------------------------------------------------------------
# SelsaAggregator


def _np_selsa(p, x, ref, heads):
    n, c = x.shape
    m = ref.shape[0]
    d = c // heads
    lin = lambda name, a: a @ p[name + '.weight'].T + p[name + '.bias']  # noqa: E731
    q = lin('fc_embed', x).reshape(n, heads, d)
    k = lin('ref_fc_embed', ref).reshape(m, heads, d)
    v = lin('ref_fc', ref).reshape(m, heads, d)
    a = _softmax(np.einsum('ngd,mgd->gnm', q, k) / np.sqrt(d), axis=2)
    out = np.einsum('gnm,mgd->ngd', a, v).reshape(n, c)
    return lin('fc', out)


@pytest.mark.parametrize('channels,heads', [(32, 4), (1024, 16)])
def test_selsa_aggregator_matches_numpy(channels, heads):
    torch.manual_seed(2)
    agg = SelsaAggregator(channels, heads)
    x = torch.randn(5, channels)
    ref = torch.randn(9, channels) * 3
    with torch.no_grad():
        out = agg(x, ref)
    expected = _np_selsa(_params(agg), x.double().numpy(), ref.double().numpy(), heads)
    assert out.shape == (5, channels)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)


def test_selsa_cached_projections_equal_uncached():
    torch.manual_seed(3)
    agg = SelsaAggregator(32, 4)
    x = torch.randn(4, 32)
    ref_a, ref_b = torch.randn(6, 32), torch.randn(3, 32)
    with torch.no_grad():
        uncached = agg(x, torch.cat((ref_a, ref_b)))
        refs = SelsaRefProjections.cat([agg.project_refs(ref_a), agg.project_refs(ref_b)])
        cached = agg.forward_projected(x, refs)
    assert len(refs) == 9
    torch.testing.assert_close(cached, uncached, atol=1e-6, rtol=1e-6)


def test_selsa_aggregator_keys(shared):
    for method, layers in (('selsa', 2), ('troi', 3)):
        for i in range(layers):
            expected = _keys(shared, method, f'detector.roi_head.bbox_head.aggregator.{i}.')
            assert _got(SelsaAggregator(1024, 16)) == expected


# ----------------------------------------------------------------------------------------------
# TemporalRoIAlign


def test_roi_align_is_aligned_with_stride_16():
    # Feature value = column index. RoI x1=y1=16, x2=y2=72 px -> feature coords [0.5, 4.0) after
    # the -0.5 alignment offset, bins of 0.5; two samples per bin average to the bin centre.
    troi = TemporalRoIAlign(out_channels=1, num_temporal_attention_blocks=0)
    feats = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(1, 1, 6, 8).contiguous()
    rois = torch.tensor([[0.0, 16.0, 16.0, 72.0, 72.0]])
    out = troi(feats, rois)
    expected = 0.75 + 0.5 * torch.arange(7, dtype=torch.float32)
    torch.testing.assert_close(out[0, 0], expected.expand(7, 7))


def _loop_troi(troi, roi_feats, ref_feats):
    """Slow reference of MMTracking's most-similar RoI align + temporal attention, in numpy."""
    p = _params(troi)
    x = roi_feats.double().numpy()           # (n, C, 7, 7)
    refs = ref_feats.double().numpy()        # (T, C, H, W)
    n, c, rh, rw = x.shape
    t = refs.shape[0]
    k = troi.num_most_similar_points
    ref_vecs = refs.reshape(t, c, -1)        # (T, C, HW)
    ref_unit = ref_vecs / np.linalg.norm(ref_vecs, axis=1, keepdims=True)
    msr = np.zeros((t, n, c, rh, rw))
    for r in range(n):
        for i in range(rh):
            for j in range(rw):
                v = x[r, :, i, j]
                v = v / np.linalg.norm(v)
                for f in range(t):
                    sims = v @ ref_unit[f]
                    top = np.argsort(-sims)[:k]
                    wts = _softmax(sims[top], axis=0)
                    msr[f, r, :, i, j] = (ref_vecs[f][:, top] * wts).sum(axis=1)
    allx = np.concatenate((x[None], msr), axis=0)  # key RoI first: (1+T, n, C, 7, 7)
    g = troi.num_temporal_attention_blocks
    if g <= 0:
        return allx.mean(axis=0)
    w, b = p['embed_network.conv.weight'], p['embed_network.conv.bias']
    emb = _np_conv3x3(allx.reshape((1 + t) * n, c, rh, rw), w, b).reshape(1 + t, n, c, rh, rw)
    d = c // g
    out = np.zeros((n, c, rh, rw))
    for r in range(n):
        for blk in range(g):
            sl = slice(blk * d, (blk + 1) * d)
            for i in range(rh):
                for j in range(rw):
                    logits = np.array([emb[f, r, sl, i, j] @ emb[0, r, sl, i, j]
                                       for f in range(1 + t)]) / np.sqrt(d)
                    a = _softmax(logits, axis=0)
                    out[r, sl, i, j] = (allx[:, r, sl, i, j] * a[:, None]).sum(axis=0)
    return out


def _troi_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 8, 5, 6, generator=g)
    ref_feats = torch.randn(3, 8, 5, 6, generator=g)
    xy1 = torch.rand(4, 2, generator=g) * 40
    wh = torch.rand(4, 2, generator=g) * 50 + 8
    rois = torch.cat((torch.zeros(4, 1), xy1, xy1 + wh), dim=1)
    return feats, rois, ref_feats


@pytest.mark.parametrize('blocks', [4, 0])
def test_temporal_roi_align_matches_loop_reference(blocks):
    torch.manual_seed(4)
    troi = TemporalRoIAlign(out_channels=8, num_temporal_attention_blocks=blocks)
    feats, rois, ref_feats = _troi_inputs(5)
    with torch.no_grad():
        out = troi(feats, rois, ref_feats)
        expected = _loop_troi(troi, troi(feats, rois), ref_feats)
    assert out.shape == (4, 8, 7, 7)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)


def test_temporal_roi_align_chunking_is_invisible():
    torch.manual_seed(6)
    troi = TemporalRoIAlign(out_channels=8)
    feats, rois, ref_feats = _troi_inputs(7)
    with torch.no_grad():
        whole = troi(feats, rois, ref_feats, roi_chunk_size=100)
        one_by_one = troi(feats, rois, ref_feats, roi_chunk_size=1)
        troi.max_chunk_elements = 3 * 49 * 3 * 30  # auto: 3 RoIs per chunk
        auto = troi(feats, rois, ref_feats)
    torch.testing.assert_close(one_by_one, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(auto, whole, atol=1e-6, rtol=1e-6)


def test_temporal_roi_align_without_refs_is_plain_and_empty_rois():
    troi = TemporalRoIAlign(out_channels=8)
    feats, rois, ref_feats = _troi_inputs(8)
    with torch.no_grad():
        plain = troi(feats, rois)
        empty = troi(feats, rois[:0], ref_feats)
    assert plain.shape == (4, 8, 7, 7) and empty.shape == (0, 8, 7, 7)


def test_temporal_roi_align_keys(shared):
    expected = _keys(shared, 'troi', 'detector.roi_head.bbox_roi_extractor.')
    assert _got(TemporalRoIAlign(512)) == expected
