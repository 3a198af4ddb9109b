"""One training step against MMTracking 0.14's own, compared stage by stage.

A fixture is MMTracking's own ``forward_train`` + ``backward`` on one real sample
(``../shared/parity/README.md``, section ``train/``), made by ``tools/parity/train_stages.py``, which
also records MMTracking's intermediate values (``tools/parity/README.md`` lists the fields).

Which fixtures: ``$VIDDET_TRAIN_PARITY_DIR/*.json`` when that is set (frames under
``$VIDDET_TRAIN_PARITY_DATA``, default ``../shared/data/mini_vid``); otherwise the shared
``../shared/parity/train/*.json`` plus ``CI_SUBSET`` of ``tests/fixtures/train_parity/``. The whole
committed set: ``VIDDET_TRAIN_PARITY_DIR=tests/fixtures/train_parity``.

A fixture without the intermediate fields (the shared ones) takes them from the committed fixture
made from the same inputs (method, frames, checkpoint and RNG seeds, still or video). If that one
records the same losses and gradient norm (within the bars below), it is the same MMTracking step and
everything runs as for a fixture of its own. If not, MMTracking itself computed that step in two ways
on two machines (``dff_bear_k10`` and ``dff_bear_k10_still``: a float tie in its own proposal order;
swapping the tied pair in the remake's list reproduces the shared fixture's losses to 1e-6): the
stages compare viddet with the remake, and viddet's step, drawing its own RoIs, must reproduce one of
MMTracking's two results (issue 26, section 4: judged against MMTracking's own spread). A fixture with
no committed remake gets only that last check, against its own result.

Each fixture's step runs once (viddet's method, loaded from the fixture's checkpoint, in
MMTracking's train mode: stem + layer1 frozen, BatchNorm in eval mode; its sampling generator
seeded with ``rng_seed``), with MMTracking's own decisions given to it through
:class:`viddet.methods.faster_rcnn.RoITrace` (which also records what viddet computed itself): the
sampled RoIs, SELSA's / TRoI's reference proposals, and TRoI's most-similar locations at the RoI
points where MMTracking's choice was float-tied (below). Then, each a test of its own:

* ``rpn_anchors``: viddet's RPN assigner + sampler draw exactly MMTracking's anchors (positives and
  negatives), regression targets within ``TARGET_ATOL``;
* ``proposals`` (a): viddet's own proposal lists (the key frame's training proposals; SELSA / TRoI:
  each reference frame's test proposals) equal MMTracking's: the same boxes (``BOX_ATOL`` pixels)
  with the same scores (``SCORE_ATOL``) in the same order, except where the order is float-tied
  (below), and every such place is named in the output;
* ``rcnn_targets``: viddet's R-CNN assigner on MMTracking's proposals gives MMTracking's assignment,
  and viddet's targets of MMTracking's sampled RoIs are MMTracking's (labels exact, the rest within
  ``TARGET_ATOL``);
* ``losses_and_gradients`` (b): computed from MMTracking's own sampled RoIs: every loss term (and
  ``acc``, and the total) within 1e-4 relative or 1e-6 absolute, the total gradient norm within 1e-3
  relative, >= 99 % of the parameters' gradient norms within 1e-3 relative (parameters whose norm is
  below 1e-6 of the total are exempt: their true gradient is zero), and no gradient where
  MMTracking has none. No tie is forgiven here. Where MMTracking's own gradient norms moved by more
  than 1e-3 between 1 and 2 threads (``thread_spread``) while it took the same decisions, that
  spread is the bar instead;
* ``drawn_rois`` (c): the RoIs viddet draws itself from its own proposals equal MMTracking's, except
  at the named float ties (the generator and every gallery size being the same, both draws pick the
  same gallery positions; a gallery position may hold another proposal only where the two lists are
  float-tied). When a tie moves a proposal between the positive and negative galleries the two draws
  are different random permutations and cannot be compared: the test is skipped, naming the tie.

Float ties. The RPN scores of these untrained checkpoints are saturated (0.87-0.9996 over the top
6000), so adjacent proposals are often a few float32 ulps apart; two correct implementations
(oneDNN kernels, memory format, thread count) differ by ~1e-5 on the RPN logits, which may reorder
such a pair or make NMS keep the other of two overlapping boxes (and then what that box suppresses
changes too). Two proposals are float-tied when their float32 scores are at most ``TIE_ULPS`` ulps
apart or their logits at most ``LOGIT_TIE`` apart. A proposal present in one list only is accepted
when it belongs to a group of such proposals that overlap (IoU > the NMS threshold) across the two
lists and that contains a float-tied pair (NMS kept the other one), or when it sits at the end of a
full list within a tie of the other list's last score (the count limit). Nothing is searched: a
mismatch that is none of these fails.

Temporal RoI Align picks, for each key RoI point and reference frame, the 2 locations of largest
cosine similarity; where the 2nd and 3rd are within 1e-6 (``troi_most_similar``: ~0.4 % of the
points; they flip at gaps of 1-2 float32 ulps), float noise picks either, and a handful of such flips
move ~25 gradient norms by ~0.1 %. MMTracking's choices at exactly those recorded points are given to
viddet's step; everywhere else viddet searches itself.

Gradient norms are taken as the fixtures take them (float32 ``torch.linalg.vector_norm`` per
parameter, as gradient clipping does).
"""
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from viddet.checkpoints.loading import load_into
from viddet.checkpoints.reading import read_checkpoint
from viddet.data.transforms import preprocess
from viddet.methods import build_method, method_class
from viddet.methods.faster_rcnn import RoITrace
from viddet.models.losses import rcnn_targets, rpn_targets, sum_losses
from viddet.models.sampling import SamplingResult, max_iou_assign
from viddet.structures import TrainSample


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
OWN_DIR = REPO / 'tests' / 'fixtures' / 'train_parity'
TRAIN_DIR = Path(os.environ['VIDDET_TRAIN_PARITY_DIR']) if os.environ.get('VIDDET_TRAIN_PARITY_DIR') else None
DATA_DIR = Path(os.environ.get('VIDDET_TRAIN_PARITY_DATA', SHARED / 'data' / 'mini_vid'))
CI_SUBSET = ('dff_boat_k15_c2_r5', 'dff_libby_k8_still_c1_r3', 'fgfa_dog_k20_c1_r5', 'selsa_boat_k27_c2_r3',
             'troi_car-turn_k40_c1_r7')
"""The committed fixtures that run by default besides the shared ones: every method, other snippets and
seeds, a still image, a float tie in the drawn RoIs (dff_boat), in a reference proposal list
(selsa_boat) and in Temporal RoI Align's most-similar search (troi_car-turn)."""

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
GRAD_RTOL, GRAD_FRACTION, GRAD_EXEMPT = 1e-3, 0.99, 1e-6
CHECKSUM_RTOL = 1e-6   # float64 sums of the same float32 tensor (up to 1-ulp rounding), another order
BOX_ATOL = 1e-2        # pixels: a proposal's box in both lists (decoded from deltas that differ by ~1e-6)
SCORE_ATOL = 1e-5      # a proposal's score in both lists
TARGET_ATOL = 1e-5     # regression targets (deltas / stds) of the same boxes
TIE_ULPS = 2           # float32 scores this close may be ordered either way ...
LOGIT_TIE = 1e-4       # ... and so may logits this close (implementations differ by ~1e-5)


# ------------------------------------------------------------------------------ fixtures and their stages
def _fixture_files() -> List[Path]:
    if TRAIN_DIR is not None:
        files = sorted(TRAIN_DIR.glob('*.json')) if TRAIN_DIR.is_dir() else []
    else:
        shared = SHARED / 'parity' / 'train'
        files = sorted(shared.glob('*.json')) if shared.is_dir() else []
        files += [OWN_DIR / f'{n}.json' for n in CI_SUBSET]   # committed: missing is an error
    head = {f: json.loads(f.read_text()) for f in files}
    # one checkpoint after the other (each is made once, see _Checkpoints)
    return sorted(files, key=lambda f: (head[f]['checkpoint_keys'], head[f]['checkpoint_seed'], str(f)))


FIXTURES = _fixture_files()
IDS = [f'{f.parent.name}/{f.stem}' for f in FIXTURES]
STAGE_FIELDS = ('rpn_targets', 'proposals', 'rcnn_assigned_gt_inds', 'rcnn_sampling', 'rcnn_targets')


def _provenance(fx: dict) -> tuple:
    return (fx['method'], fx['frames_dir'], fx['key_file'], tuple(fx['ref_files']), fx['checkpoint_keys'],
            fx['checkpoint_seed'], fx['rng_seed'], bool(fx['is_video_data']))


def _same_run(a: dict, b: dict) -> bool:
    """Two fixtures record the same MMTracking step: losses within the loss bar, total gradient norm
    within the gradient bar (two machines' float rounding, same decisions)."""
    close = lambda x, y, rtol: abs(x - y) <= max(LOSS_ATOL, rtol * abs(y))  # noqa: E731
    return set(a['losses']) == set(b['losses']) \
        and all(close(a['losses'][k], b['losses'][k], LOSS_RTOL) for k in a['losses']) \
        and close(a['total_grad_norm'], b['total_grad_norm'], GRAD_RTOL)


@dataclass
class Reference:
    """MMTracking's side of one fixture.

    Attributes:
        fx: the fixture.
        stages: the intermediate values of an MMTracking step on the same inputs (None: unknown).
        inject: ``stages`` are the fixture's own step's, so its sampled RoIs are given to viddet's step.
        results: (name, fixture) of every MMTracking result recorded for these inputs, the fixture's
            first: more than one when MMTracking itself computed the step differently elsewhere.
        why: why ``stages`` is None, or why its RoIs are not given.
    """
    fx: dict
    stages: Optional[dict]
    inject: bool
    results: List[Tuple[str, dict]]
    why: str = ''


@functools.lru_cache(maxsize=None)
def _reference(fixture: Path) -> Reference:
    fx = json.loads(fixture.read_text())
    if all(k in fx for k in STAGE_FIELDS):
        return Reference(fx, fx, True, [(fixture.stem, fx)])
    for f in sorted(OWN_DIR.glob('*.json')) if OWN_DIR.is_dir() else []:
        other = json.loads(f.read_text())
        if not (all(k in other for k in STAGE_FIELDS) and _provenance(other) == _provenance(fx)):
            continue
        if _same_run(other, fx):
            return Reference(fx, other, True, [(fixture.stem, fx)])
        diff = {k: f'{fx["losses"][k]:.7g} / {v:.7g}' for k, v in other['losses'].items()
                if abs(v - fx['losses'][k]) > max(LOSS_ATOL, LOSS_RTOL * abs(v))}
        return Reference(fx, other, False, [(fixture.stem, fx), (f'{OWN_DIR.name}/{f.name}', other)],
                         f'MMTracking computed this step from the same inputs differently where '
                         f'{OWN_DIR.name}/{f.name} was made ({diff}; see {OWN_DIR.name}/README.md): the stages '
                         'compare with that run, and viddet\'s own RoIs must reproduce one of MMTracking\'s results')
    return Reference(fx, None, False, [(fixture.stem, fx)],
                     'the fixture has no intermediate values and no committed fixture was made from the same inputs '
                     '(remake it with tools/parity/train_stages.py)')


# ------------------------------------------------------------------------------ inputs
def _image(path: Path, checksum: dict):
    """Preprocessed (3, Hp, Wp) tensor and meta of one frame; checks the fixture's checksums."""
    if not path.exists():
        pytest.skip(f'{path} is absent: the training parity test needs the mini_vid frames')
    img, meta = preprocess(cv2.imread(str(path)))
    assert list(img.shape) == checksum['shape'], path
    x = img.double()
    # the uint8 image must be MMTracking's; its normalisation may round 1 ulp apart (OpenCV 4.11 and 5.x
    # differ so), which moves the sum by at most ulp(1) * sum|x| <= 2.4e-7 * sqrt(n * sum_sq)
    ulp_noise = 2.4e-7 * float(np.sqrt(x.numel() * checksum['sum_sq']))
    assert abs(x.sum().item() - checksum['sum']) <= max(CHECKSUM_RTOL * abs(checksum['sum']), ulp_noise), path
    assert (x * x).sum().item() == pytest.approx(checksum['sum_sq'], rel=CHECKSUM_RTOL), path
    return img, meta


def _sample(fx: dict) -> TrainSample:
    frames = DATA_DIR / fx['frames_dir']
    img, meta = _image(frames / fx['key_file'], fx['input_checksums']['img'])
    refs = [_image(frames / f, c) for f, c in zip(fx['ref_files'], fx['input_checksums']['ref_imgs'])]
    assert list(meta.img_shape) == fx['img_shape'] and list(meta.pad_shape) == fx['pad_shape']
    np.testing.assert_allclose(meta.scale_factor, fx['scale_factor'], rtol=1e-7)
    metas = [meta] + [m for _, m in refs]
    return TrainSample(img, torch.stack([r for r, _ in refs]), metas,
                       torch.tensor(fx['gt_bboxes'], dtype=torch.float32),
                       torch.tensor(fx['gt_labels'], dtype=torch.int64),
                       is_video_data=bool(fx['is_video_data']), seed=int(fx['rng_seed']))


def _proposals(rec: dict) -> torch.Tensor:
    """(k, 5) float32 proposals of a fixture's proposal record."""
    boxes = torch.tensor(rec['boxes'], dtype=torch.float32).view(-1, 4)
    return torch.cat([boxes, torch.tensor(rec['scores'], dtype=torch.float32).view(-1, 1)], 1)


def _mmt_sampling(st: dict, gt_bboxes: torch.Tensor) -> SamplingResult:
    """MMTracking's sampled RoIs (indices into [gt boxes; proposals]) as a viddet SamplingResult."""
    cand = torch.cat([gt_bboxes, _proposals(st['proposals'])[:, :4]])
    s = st['rcnn_sampling']
    pos, neg = torch.tensor(s['pos_inds'], dtype=torch.int64), torch.tensor(s['neg_inds'], dtype=torch.int64)
    assigned = torch.tensor(s['pos_assigned_gt_inds'], dtype=torch.int64)
    return SamplingResult(pos, neg, cand[pos], cand[neg], gt_bboxes[assigned],
                          torch.tensor(s['pos_gt_labels'], dtype=torch.int64),
                          torch.tensor(s['pos_is_gt'], dtype=torch.bool), int(s['num_gts']))


def _most_similar(rec: dict) -> torch.Tensor:
    """(points, frames, k) locations: MMTracking's at its float-tied points, -1 (viddet's own) elsewhere."""
    given = torch.full((rec['num_points'], rec['num_frames'], rec['k']), -1, dtype=torch.int64)
    for p, f, *locations in rec['points']:
        given[p, f] = torch.tensor(locations)
    return given


# ------------------------------------------------------------------------------ the step (once per fixture)
class _Checkpoints:
    """The fixture's checkpoint: seed 0 from the session's shared cache (the inference parity tests
    use the same files); other seeds made here, one at a time (fixtures come sorted by checkpoint)."""

    def __init__(self, parity_checkpoint, tmp: Path):
        self.shared, self.tmp, self.current = parity_checkpoint, tmp, None

    def get(self, keys: str, seed: int) -> Path:
        parity = SHARED / 'parity'
        if seed == 0:
            return self.shared(keys, 0, parity)
        if self.current and self.current[0] == (keys, seed):
            return self.current[1]
        self.drop()
        if not (parity / 'make_checkpoint.py').exists():
            pytest.skip(f'{parity / "make_checkpoint.py"} is absent')
        out = self.tmp / f'{Path(keys).stem}_seed{seed}.pth'
        subprocess.run([sys.executable, str(parity / 'make_checkpoint.py'), str(parity / 'keys' / keys), str(out),
                        '--seed', str(seed)], check=True)
        self.current = ((keys, seed), out)
        return out

    def drop(self):
        if self.current:
            self.current[1].unlink(missing_ok=True)
            self.current = None


@pytest.fixture(scope='module')
def checkpoints(parity_checkpoint, tmp_path_factory):
    c = _Checkpoints(parity_checkpoint, tmp_path_factory.mktemp('train_parity_ckpt'))
    yield c
    c.drop()


@dataclass
class Step:
    """What viddet's step computed, kept per fixture (small: no model, no gradients)."""
    losses: Dict[str, float]
    grad_norms: Dict[str, Optional[float]]
    total_grad_norm: float
    proposals: torch.Tensor
    drawn: SamplingResult
    ref_proposals: Optional[List[torch.Tensor]]
    rpn: object                   # viddet's RPNTargets of the key frame (same generator, first draw)
    injected: bool                # the step used MMTracking's sampled RoIs
    train_cfg: object
    ref_max_per_img: int          # reference frames' (test) proposals


_STEPS: Dict[Path, Step] = {}


def _step(fixture: Path, checkpoints: _Checkpoints) -> Step:
    if fixture in _STEPS:
        return _STEPS[fixture]
    ref = _reference(fixture)
    fx = ref.fx
    sample = _sample(fx)
    state, _ = read_checkpoint(checkpoints.get(fx['checkpoint_keys'], int(fx['checkpoint_seed'])))
    model = build_method(fx['method'], fx['backbone'])
    load_into(model, state, fixture.name)
    del state
    model.train()
    cfg = model.train_cfg
    trace = RoITrace()
    if ref.inject:
        trace.given_sampling = _mmt_sampling(ref.stages, sample.gt_bboxes)
        if 'ref_proposals' in ref.stages:
            trace.given_ref_proposals = [_proposals(r) for r in ref.stages['ref_proposals']]
        if 'troi_most_similar' in ref.stages:
            trace.given_most_similar = _most_similar(ref.stages['troi_most_similar'])
    with model.tracing(trace):
        losses = model.forward_train(sample)
    sum_losses(losses).backward()
    norms = {n: (None if p.grad is None else float(torch.linalg.vector_norm(p.grad)))
             for n, p in model.named_parameters()}
    head = model.detector.rpn_head
    feat = (sample.img.shape[1] // head.stride, sample.img.shape[2] // head.stride)
    rpn = rpn_targets(head.anchors(feat, 'cpu'), sample.gt_bboxes, sample.img_shape, cfg, sample.generator())
    step = Step({k: float(v.detach()) for k, v in losses.items()}, norms,
                float(np.sqrt(sum(v * v for v in norms.values() if v is not None))),
                trace.proposals, trace.drawn, trace.ref_proposals, rpn, ref.inject, cfg,
                model.detector.rpn_test_cfg.max_per_img)
    print(f'{fixture.stem}: losses {dict((k, round(v, 7)) for k, v in step.losses.items())}'
          f'{" (MMTracking RoIs given)" if step.injected else ""}')
    _STEPS[fixture] = step
    return step


def _need_stages(fixture: Path) -> dict:
    ref = _reference(fixture)
    if ref.stages is None:
        pytest.skip(ref.why)
    return ref.stages


# ------------------------------------------------------------------------------ proposal lists
def _ulps(a: float, b: float) -> int:
    ia, ib = (int(np.array(v, np.float32).view(np.int32)) for v in (a, b))
    return abs(ia - ib)


def _tied(sa: float, sb: float, la: Optional[float] = None, lb: Optional[float] = None) -> bool:
    """Float-tied: scores within TIE_ULPS float32 ulps, or logits (given, else from the scores) within LOGIT_TIE."""
    if _ulps(sa, sb) <= TIE_ULPS:
        return True
    if la is None or lb is None:
        la, lb = (float(np.log(s) - np.log1p(-s)) if 0 < s < 1 else float('inf') for s in (sa, sb))
    return abs(la - lb) <= LOGIT_TIE


@dataclass
class ListComparison:
    """viddet's proposal list against MMTracking's. ``to_mmt[i]``: MMTracking's index of viddet's
    proposal i (-1: not in MMTracking's list); ``ties``: named float ties; ``problems``: the rest."""
    to_mmt: List[int]
    ties: List[str]
    problems: List[str]
    tied_mmt: set       # MMTracking positions involved in a tie
    tied_vd: set        # viddet positions involved in a tie


def compare_lists(mmt: dict, vd: torch.Tensor, max_per_img: int, nms_iou: float,
                  mmt_elsewhere: Optional[Tuple[str, List[int]]] = None) -> ListComparison:
    """Matches viddet's proposals (k, 5) to MMTracking's record (boxes, scores, logits, anchors); see
    the module docstring for what is accepted. ``mmt_elsewhere``: (where, anchors of the proposals in
    the order MMTracking itself gave them there), e.g. at another thread count: cited for the ties
    MMTracking itself resolves the other way."""
    other_rank = {a: r for r, a in enumerate(mmt_elsewhere[1])} if mmt_elsewhere else {}
    m = _proposals(mmt)
    m_logits = mmt.get('logits')
    vd = vd.detach().float().cpu()
    nm, nv = len(m), len(vd)
    dist = (vd[:, None, :4] - m[None, :, :4]).abs().amax(-1) if nm and nv else torch.zeros(nv, nm)
    to_mmt, taken = [-1] * nv, set()
    for i in range(nv):
        cands = [j for j in (dist[i] <= BOX_ATOL).nonzero().view(-1).tolist() if j not in taken]
        if cands:
            j = min(cands, key=lambda c: (abs(c - i), c))
            to_mmt[i] = j
            taken.add(j)
    problems, ties, tied_m, tied_v = [], [], set(), set()
    for i, j in enumerate(to_mmt):
        if j >= 0 and abs(float(vd[i, 4]) - float(m[j, 4])) > SCORE_ATOL:
            problems.append(f'proposal {j}: score {float(vd[i, 4]):.8g} vs {float(m[j, 4]):.8g}')
    # order of the proposals in both lists: any pair ordered differently must be float-tied
    pairs = [(i, j) for i, j in enumerate(to_mmt) if j >= 0]
    ms = np.array([j for _, j in pairs])
    for a in range(len(pairs)):
        later = np.nonzero(ms[a + 1:] < ms[a])[0]
        for b in later + a + 1:
            (iv, jm), (iv2, jm2) = pairs[a], pairs[b]
            la, lb = (m_logits[jm], m_logits[jm2]) if m_logits else (None, None)
            sa, sb = float(m[jm, 4]), float(m[jm2, 4])
            if _tied(sa, sb, la, lb):
                tied_m.update((jm, jm2))
                tied_v.update((iv, iv2))
                anchors = mmt.get('anchors') or []
                r1, r2 = (other_rank.get(anchors[j]) if anchors else None for j in (jm, jm2))
                itself = f'; so does MMTracking itself {mmt_elsewhere[0]}' if None not in (r1, r2) and r1 < r2 else ''
                ties.append(f'MMTracking lists proposal {jm2} before {jm}, viddet after (scores {sb:.9g} / '
                            f'{sa:.9g}{"" if la is None else f", logits {lb:.8g} / {la:.8g}"}){itself}')
            else:
                problems.append(f'order of MMTracking proposals {jm2} and {jm} (scores {sb:.9g} / {sa:.9g}) '
                                f'differs and is not a float tie')
    # proposals in one list only
    only_m = [j for j in range(nm) if j not in taken]
    only_v = [i for i in range(nv) if to_mmt[i] < 0]
    if only_m or only_v:
        boxes = torch.cat([m[only_m, :4], vd[only_v, :4]])
        scores = [float(m[j, 4]) for j in only_m] + [float(vd[i, 4]) for i in only_v]
        side = ['m'] * len(only_m) + ['v'] * len(only_v)
        iou = box_iou(boxes, boxes)
        parent = list(range(len(side)))

        def root(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k
        cross = [(a, b) for a in range(len(side)) for b in range(len(side))
                 if side[a] == 'm' and side[b] == 'v' and float(iou[a, b]) > nms_iou]
        for a, b in cross:
            parent[root(a)] = root(b)
        tied_groups = {root(a) for a, b in cross if _tied(scores[a], scores[b])}
        last_m, last_v = (float(m[-1, 4]) if nm else 0.0), (float(vd[-1, 4]) if nv else 0.0)
        for k, (s, sc) in enumerate(zip(side, scores)):
            idx = only_m[k] if s == 'm' else only_v[k - len(only_m)]
            who = f'MMTracking\'s proposal {idx}' if s == 'm' else f'viddet\'s proposal {idx}'
            other_full, other_last = (nv >= max_per_img, last_v) if s == 'm' else (nm >= max_per_img, last_m)
            if root(k) in tied_groups:
                note = 'takes the place of an overlapping float-tied proposal of the other list: NMS kept the other one'
            elif other_full and (sc <= other_last or _tied(sc, other_last)):
                note = f'is cut by the count limit in the other list (its last score {other_last:.9g})'
            else:
                problems.append(f'{who} (score {sc:.9g}, box {boxes[k].tolist()}) is not in the other list '
                                'and no float tie explains it')
                continue
            (tied_m if s == 'm' else tied_v).add(idx)
            ties.append(f'{who} (score {sc:.9g}) {note}')
    return ListComparison(to_mmt, ties, problems, tied_m, tied_v)


# ------------------------------------------------------------------------------ the tests
def _params():
    return pytest.mark.parametrize('fixture', FIXTURES, ids=IDS)


def needs_fixtures(test):
    """A slow test over the fixtures, skipped when there are none."""
    return pytest.mark.slow(_no_fixtures(test))


_no_fixtures = pytest.mark.skipif(not FIXTURES, reason='no training parity fixtures (the shared data folder must '
                                  'sit beside the repository, or set VIDDET_TRAIN_PARITY_DIR)')


@needs_fixtures
@_params()
def test_rpn_anchors(fixture, checkpoints):
    """viddet's RPN assigner + sampler draw MMTracking's anchors, with its regression targets."""
    st = _need_stages(fixture)
    step = _step(fixture, checkpoints)
    t, ref = step.rpn, st['rpn_targets']
    sampled = t.label_weights > 0
    pos = (sampled & (t.labels == 1)).nonzero().view(-1).tolist()
    neg = (sampled & (t.labels == 0)).nonzero().view(-1).tolist()
    assert pos == ref['pos_anchors'], f'{fixture.stem}: positive anchors differ'
    assert neg == ref['neg_anchors'], f'{fixture.stem}: negative anchors differ'
    np.testing.assert_allclose(t.bbox_targets[pos].numpy(), np.array(ref['pos_bbox_targets']).reshape(-1, 4),
                               atol=TARGET_ATOL, rtol=0)


def _elsewhere(st: dict, ref: Optional[int]):
    """(where, anchor order) of MMTracking's own list at the fixture's other thread count, if recorded."""
    spread = st.get('thread_spread')
    if not spread:
        return None
    own = st['proposals'] if ref is None else st['ref_proposals'][ref]
    change = spread.get('proposals') if ref is None else (spread.get('ref_proposals') or [None] * (ref + 1))[ref]
    anchors = list(own['anchors'])
    if change:   # {'length', 'changed': [[position, anchor], ...]}
        anchors = (anchors + [None] * change['length'])[:change['length']]
        for i, a in change['changed']:
            anchors[i] = a
    return f'at {spread["threads"]} thread(s)', anchors


@needs_fixtures
@_params()
def test_proposals(fixture, checkpoints):
    """(a) viddet's proposal lists equal MMTracking's up to BOX_ATOL / SCORE_ATOL; ties named."""
    st = _need_stages(fixture)
    step = _step(fixture, checkpoints)
    cfg = step.train_cfg
    lists = [('key frame', st['proposals'], step.proposals, cfg.rpn_proposal_max_per_img, _elsewhere(st, None))]
    for r, (mmt, own) in enumerate(zip(st.get('ref_proposals', []), step.ref_proposals or [])):
        lists.append((f'reference {r}', mmt, own, step.ref_max_per_img, _elsewhere(st, r)))
    assert len(lists) == 1 + len(st.get('ref_proposals', [])), 'viddet made no reference proposals'
    problems = []
    for name, mmt, own, max_per_img, elsewhere in lists:
        c = compare_lists(mmt, own, max_per_img, cfg.rpn_proposal_nms_iou, elsewhere)
        print(f'{fixture.stem} {name}: {len(own)} proposals, {len(c.ties)} float ties'
              + ''.join(f'\n    tie: {t}' for t in c.ties))
        assert len(own) <= max_per_img
        problems += [f'{name}: {p}' for p in c.problems]
    assert not problems, f'{fixture.stem}: ' + '; '.join(problems[:10])


@needs_fixtures
@_params()
def test_rcnn_targets(fixture):
    """viddet's R-CNN assignment of MMTracking's proposals and the targets of MMTracking's RoIs."""
    st = _need_stages(fixture)
    fx = _reference(fixture).fx
    gt_b = torch.tensor(fx['gt_bboxes'], dtype=torch.float32)
    gt_l = torch.tensor(fx['gt_labels'], dtype=torch.int64)
    cfg = method_class(fx['method']).train_config()
    assign = max_iou_assign(_proposals(st['proposals']), gt_b, cfg.rcnn_assigner, gt_l)
    assert assign.gt_inds.tolist() == st['rcnn_assigned_gt_inds']
    t = rcnn_targets(_mmt_sampling(st, gt_b), num_classes=30)   # ImageNet VID
    ref = st['rcnn_targets']
    assert t.labels.tolist() == ref['labels']
    np.testing.assert_allclose(t.label_weights.numpy(), ref['label_weights'], atol=0)
    npos = len(st['rcnn_sampling']['pos_inds'])
    np.testing.assert_allclose(t.bbox_targets[:npos].numpy(), np.array(ref['pos_bbox_targets']).reshape(-1, 4),
                               atol=TARGET_ATOL, rtol=0)
    assert bool((t.bbox_targets[npos:] == 0).all()) and bool((t.bbox_weights[:npos] == 1).all()) \
        and bool((t.bbox_weights[npos:] == 0).all())


def _result_errors(step: Step, fx: dict) -> List[str]:
    """Where viddet's losses and gradient norms miss one MMTracking result's bars (empty: none)."""
    errors = []
    for k, ref in fx['losses'].items():
        mine = sum(v for n, v in step.losses.items() if 'loss' in n) if k == 'loss' else step.losses[k]
        if abs(mine - ref) > max(LOSS_ATOL, LOSS_RTOL * abs(ref)):
            errors.append(f'{k} {mine:.7g} vs {ref:.7g}')
    assert set(step.grad_norms) == set(fx['grad_norms']), 'parameter names differ from the fixture'
    spread = fx.get('thread_spread') or {}
    # MMTracking's own change between thread counts, when it took the same decisions, is a float bar too
    spread_rtol = spread.get('grad_norm_spread', {}) if not spread.get('stages_that_differ') else {}
    checked, off, wrong_frozen = 0, [], []
    for name, ref in fx['grad_norms'].items():
        mine = step.grad_norms[name]
        if ref is None:
            if mine is not None and mine != 0:
                wrong_frozen.append(name)
            continue
        if ref < GRAD_EXEMPT * fx['total_grad_norm']:
            continue
        checked += 1
        if mine is None or abs(mine - ref) > max(GRAD_RTOL, spread_rtol.get(name, 0.0)) * ref:
            off.append(f'{name} {mine} vs {ref}')
    if wrong_frozen:
        errors.append(f'gradients of parameters frozen in MMTracking: {wrong_frozen[:5]}')
    if abs(step.total_grad_norm - fx['total_grad_norm']) > GRAD_RTOL * fx['total_grad_norm']:
        errors.append(f'total gradient norm {step.total_grad_norm:.7g} vs {fx["total_grad_norm"]:.7g}')
    if checked <= 100 or len(off) > (1 - GRAD_FRACTION) * checked:
        errors.append(f'{checked - len(off)}/{checked} gradient norms within {GRAD_RTOL}; off: {off[:5]}')
    return errors


@needs_fixtures
@_params()
def test_losses_and_gradients(fixture, checkpoints):
    """(b) losses and gradients from MMTracking's own sampled RoIs: 1e-4 / 1e-3, no tie forgiven."""
    ref = _reference(fixture)
    step = _step(fixture, checkpoints)
    if ref.inject:
        errors = _result_errors(step, ref.fx)
        assert not errors, f'{fixture.stem}, from MMTracking\'s sampled RoIs: ' + '; '.join(errors)
        return
    # viddet's own RoIs: its result must be one of MMTracking's (the float spread of MMTracking itself)
    errors = {name: _result_errors(step, fx) for name, fx in ref.results}
    matched = [name for name, e in errors.items() if not e]
    print(f'{fixture.stem}: from viddet\'s own RoIs ({ref.why}); equals MMTracking\'s {matched}')
    assert matched, f'{fixture.stem}, from viddet\'s own RoIs ({ref.why}): ' + ' | '.join(
        f'against {name}: ' + '; '.join(e) for name, e in errors.items())


def _galleries(gt_inds: torch.Tensor, num_gts: int):
    """(positive, negative) candidate indices of [gt boxes; proposals], in index order."""
    inds = torch.cat([torch.arange(1, num_gts + 1), gt_inds])
    return (inds > 0).nonzero().view(-1).tolist(), (inds == 0).nonzero().view(-1).tolist()


@needs_fixtures
@_params()
def test_drawn_rois(fixture, checkpoints):
    """(c) the RoIs viddet draws itself equal MMTracking's wherever the proposal order is not float-tied."""
    st = _need_stages(fixture)
    fx = _reference(fixture).fx
    step = _step(fixture, checkpoints)
    cfg = step.train_cfg
    g = len(fx['gt_bboxes'])
    c = compare_lists(st['proposals'], step.proposals, cfg.rpn_proposal_max_per_img, cfg.rpn_proposal_nms_iou,
                      _elsewhere(st, None))
    gt_b = torch.tensor(fx['gt_bboxes'], dtype=torch.float32)
    gt_l = torch.tensor(fx['gt_labels'], dtype=torch.int64)
    mine = max_iou_assign(step.proposals, gt_b, cfg.rcnn_assigner, gt_l)
    gal_m = _galleries(torch.tensor(st['rcnn_assigned_gt_inds']), g)
    gal_v = _galleries(mine.gt_inds, g)
    # a viddet candidate as MMTracking's candidate index, or ('viddet', i) for a proposal MMTracking lacks
    ident = lambda k: k if k < g else (g + c.to_mmt[k - g] if c.to_mmt[k - g] >= 0 else ('viddet', k - g))  # noqa
    tied = {g + j for j in c.tied_mmt} | {('viddet', i) for i in c.tied_vd}
    drawn_m = (st['rcnn_sampling']['pos_inds'], st['rcnn_sampling']['neg_inds'])
    drawn_v = (step.drawn.pos_inds.tolist(), step.drawn.neg_inds.tolist())
    notes = []
    for kind, gm, gv, dm, dv in zip(('positive', 'negative'), gal_m, gal_v, drawn_m, drawn_v):
        if len(gm) != len(gv):
            moved = set(gm) ^ {ident(k) for k in gv}
            assert moved <= tied, f'{fixture.stem}: the {kind} galleries differ ({len(gm)} vs {len(gv)}) at ' \
                                  f'untied candidates {sorted(map(str, moved - tied))}'
            moved = sorted(map(str, moved))
            pytest.skip(f'{fixture.stem}: a float tie moves proposals {moved} (MMTracking indices into '
                        f'[gt; proposals]) between the galleries ({kind}: {len(gm)} vs {len(gv)}), so the two draws '
                        'are different permutations; stage (b) checks the losses from MMTracking\'s RoIs')
        rank_m = {k: r for r, k in enumerate(gm)}
        rank_v = {k: r for r, k in enumerate(gv)}
        pm, pv = sorted(rank_m[k] for k in dm), sorted(rank_v[k] for k in dv)
        assert pm == pv, f'{fixture.stem}: viddet draws other {kind} gallery positions than MMTracking'
        for r in pm:
            if gm[r] != ident(gv[r]):
                assert gm[r] in tied and ident(gv[r]) in tied, \
                    f'{fixture.stem}: {kind} RoI at gallery position {r} differs at an untied proposal'
                notes.append(f'{kind} gallery position {r}: MMTracking drew candidate {gm[r]}, viddet {ident(gv[r])} '
                             '(float tie)')
    print(f'{fixture.stem}: drawn RoIs equal' + (' except at named float ties:' if notes else '')
          + ''.join(f'\n    {n}' for n in notes))


# ------------------------------------------------------------------------------ the comparison itself (fast)
def _record(rows):
    """A fixture-style proposal record of rows (x1, y1, x2, y2, score)."""
    t = torch.tensor(rows, dtype=torch.float32)
    return dict(boxes=t[:, :4].tolist(), scores=t[:, 4].tolist())


def _rows(n, score0=0.99, step=1e-3):
    """n disjoint boxes with clearly different scores (best first)."""
    return [[40.0 * i, 0.0, 40.0 * i + 30.0, 30.0, score0 - step * i] for i in range(n)]


def test_compare_lists_equal_lists_have_no_ties():
    rows = _rows(6)
    c = compare_lists(_record(rows), torch.tensor(rows), 600, 0.7)
    assert c.problems == [] and c.ties == [] and c.to_mmt == list(range(6))


def test_compare_lists_names_a_swapped_float_tie_and_rejects_an_untied_swap():
    rows = _rows(6)
    rows[3][4] = float(np.nextafter(np.float32(rows[2][4]), np.float32(0)))   # 1 ulp below proposal 2
    swapped = [rows[i] for i in (0, 1, 3, 2, 4, 5)]
    c = compare_lists(_record(rows), torch.tensor(swapped), 600, 0.7)
    assert c.problems == [] and len(c.ties) == 1 and c.tied_mmt == {2, 3}
    untied = [rows[i] for i in (0, 2, 1, 3, 4, 5)]
    c = compare_lists(_record(rows), torch.tensor(untied), 600, 0.7)
    assert len(c.problems) == 1 and 'not a float tie' in c.problems[0]


def test_compare_lists_names_an_nms_choice_between_tied_boxes():
    rows = _rows(6)
    other = list(rows[2])
    other[0] += 2.0   # overlaps proposal 2 (IoU > 0.7), same score: NMS may keep either
    c = compare_lists(_record(rows), torch.tensor(rows[:2] + [other] + rows[3:]), 600, 0.7)
    assert c.problems == [] and len(c.ties) == 2 and c.tied_mmt == {2}
    other[4] -= 1e-4  # the same box with a clearly lower score: not a tie
    c = compare_lists(_record(rows), torch.tensor(rows[:2] + [other] + rows[3:]), 600, 0.7)
    assert len(c.problems) == 2


def test_compare_lists_box_and_score_tolerances():
    rows = _rows(4)
    near = [list(r) for r in rows]
    near[1][0] += BOX_ATOL / 2
    near[2][4] += SCORE_ATOL / 2
    assert compare_lists(_record(rows), torch.tensor(near), 600, 0.7).problems == []
    near[2][4] += 2 * SCORE_ATOL
    assert len(compare_lists(_record(rows), torch.tensor(near), 600, 0.7).problems) == 1


def test_compare_lists_count_limit_at_a_tie():
    rows = _rows(4)
    rows[3][4] = rows[2][4]
    extra = list(rows[3])
    extra[0] += 200.0  # elsewhere, same score as the last ones: the count limit cut one or the other
    c = compare_lists(_record(rows), torch.tensor(rows[:3] + [extra]), 4, 0.7)
    assert c.problems == [] and len(c.ties) == 2
