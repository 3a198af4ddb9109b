"""Seq-NMS: offline linking of per-frame detections into tubes, with rescoring and suppression.

Han et al., "Seq-NMS for Video Object Detection", 2016 (arXiv:1602.08465), Sec. 3, with the exact
semantics of FGFA's reference code (github msracver/Flow-Guided-Feature-Aggregation,
``lib/nms/seq_nms.py``: ``createLinks``, ``maxPath``, ``findMaxPath``, ``rescore``, ``deleteLink``):

Per class independently, over the whole video:

1. **Links**: box *i* of frame *t* is linked to box *j* of frame *t + 1* when their IoU is
   ``>= link_iou`` (0.5). IoU uses the +1 pixel convention of the original:
   ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``, ``inter = max(0, min(x2) - max(x1) + 1) * (same in y)``,
   ``IoU = inter / (area_1 + area_2 - inter)``.
2. **Best path**: dynamic programming over frames, ``a[t, j] = s_j + max(0, max_i a[t - 1, i])`` over
   the boxes *i* linked to *j* (the predecessor is the first *i* reaching the maximum); the path ends
   at the first maximum of ``a`` in (frame, box) order and is followed back.
3. **Stop** when the best path sum is ``< min_path_score`` (0.01) or no link is left (also before the
   first path: a class without any link is returned unchanged).
4. **Rescore** the path's boxes: ``'avg'`` = path sum / path length (Seq-NMS's default, the original's
   ``rescore``), ``'max'`` = the path's highest score, ``'none'`` = scores unchanged (the paper's
   Sec. 3 "average" and "max" rescoring).
5. **Suppress** in each frame of the path the other boxes whose IoU with the path box is
   ``>= suppress_iou`` (0.3); they are removed from the output and their links go. The path boxes
   take no further part (their links go too). Repeat from 2.

Boxes that never lie on a path and are never suppressed are kept with their original scores (as in
the original's output). Everything is computed in float64; ties resolve as in the original.

The original recomputes the whole dynamic programme and its Python box-pair loops for every path.
Here the result is the same but the work is incremental:

* links (and the within-frame overlaps used to suppress) come from vectorised IoU over padded
  chunks of frames, one class at a time;
* the dynamic programme runs only over *linked* boxes (boxes with at least one link), one numpy
  step per frame; after a path only the frames whose scores or links changed are recomputed, and
  the recomputation stops at the first later frame whose values did not change;
* boxes without any link (never linked, or whose links have all gone) can only be single-box paths
  with their own score: they wait in a score-sorted queue, and each step takes the better of the
  queue head and the dynamic programme's maximum (same key: sum, then frame, then box order).

Complexity per class: O(sum_t n_t n_{t+1} + sum_t n_t^2) for links and overlaps plus, per path,
O(n_t n_{t+1}) for each recomputed frame (usually the path's frames and one more; in the worst case
a change propagates to the end of the video, which is what the original pays for every path).
"""
from __future__ import annotations

import heapq
from typing import List, Optional, Sequence, Tuple

import numpy as np

LINK_IOU = 0.5
"""IoU (+1 pixel convention) from which two boxes of consecutive frames are linked (FGFA ``IOU_THRESH``)."""
SUPPRESS_IOU = 0.3
"""IoU (+1 pixel convention) from which a box of a path frame is suppressed by the path box (``NMS_THRESH``)."""
MIN_PATH_SCORE = 0.01
"""Linking stops once the best path's score sum is below this (FGFA ``MAX_THRESH``)."""
RESCORING = ('avg', 'max', 'none')
"""Rescoring variants: path mean (Seq-NMS default), path max, none."""

_CHUNK = 20_000  # box pairs per vectorised IoU pass: small enough for the temporaries to stay in cache


def iou_plus1(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU with the +1 pixel convention, in the original's operation order.

    Args:
        boxes1: (n, 4) float64 (x1, y1, x2, y2), pixels.
        boxes2: (m, 4) float64.

    Returns:
        (n, m) float64 IoU ``inter / (area1 + area2 - inter)``.
    """
    return _iou_pairs(boxes1[:, None, :], boxes2[None, :, :])


def _iou_pairs(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """IoU of broadcast box arrays b1[..., 4] and b2[..., 4] (+1 convention); NaN boxes give NaN.

    Same operations in the same order as the original (``w = min(x2) - max(x1) + 1``, ...,
    ``inter / (area1 + area2 - inter)``), in place where possible."""
    area1 = (b1[..., 2] - b1[..., 0] + 1) * (b1[..., 3] - b1[..., 1] + 1)
    area2 = (b2[..., 2] - b2[..., 0] + 1) * (b2[..., 3] - b2[..., 1] + 1)
    w = np.minimum(b1[..., 2], b2[..., 2])
    w -= np.maximum(b1[..., 0], b2[..., 0])
    w += 1
    np.maximum(w, 0.0, out=w)
    h = np.minimum(b1[..., 3], b2[..., 3])
    h -= np.maximum(b1[..., 1], b2[..., 1])
    h += 1
    np.maximum(h, 0.0, out=h)
    w *= h
    union = area1 + area2
    union -= w
    return np.divide(w, union, out=w)


class _Blocks:
    """Links and within-frame overlaps of one class, as padded boolean blocks over chunks of frames.

    ``link(t)`` is the (n_t, n_{t+1}) link matrix view of frames t -> t + 1 and ``overlap(t, j)`` the
    (n_t,) row of box j of frame t (IoU >= suppress_iou with each box of its frame, itself included)."""

    def __init__(self, boxes: np.ndarray, counts: np.ndarray, link_iou: float, suppress_iou: float):
        num_f = len(counts)
        off = np.concatenate(([0], np.cumsum(counts)))
        self.counts = counts
        self.chunk = np.zeros(num_f, dtype=np.int64)   # chunk of each frame
        self.first: List[int] = []                     # first frame of each chunk
        self.links: List[np.ndarray] = []              # (k, nmax, nmax) links out of the chunk's frames
        self.overlaps: List[np.ndarray] = []           # (k, nmax, nmax) within-frame overlaps
        self.out_deg = np.zeros(len(boxes), dtype=np.int64)
        self.in_deg = np.zeros(len(boxes), dtype=np.int64)
        cl = counts.tolist()
        f = 0
        with np.errstate(invalid='ignore'):
            while f < num_f:
                nmax = max(cl[f], 1)
                g = f + 1       # frames f .. g-1 in this chunk (plus frame g for the links out of g-1)
                while g < num_f and (g - f + 1) * max(nmax, cl[g]) ** 2 <= _CHUNK:
                    nmax = max(nmax, cl[g])
                    g += 1
                h = min(g + 1, num_f)
                nmax = max(nmax, cl[h - 1])
                valid = np.arange(nmax)[None, :] < counts[f:h, None]
                pad = np.full((h - f, nmax, 4), np.nan)
                pad[valid] = boxes[off[f]:off[h]]
                self.overlaps.append(_iou_pairs(pad[:g - f, :, None, :], pad[:g - f, None, :, :]) >= suppress_iou)
                lk = _iou_pairs(pad[:h - f - 1, :, None, :], pad[1:h - f, None, :, :]) >= link_iou
                self.links.append(lk)
                if len(lk):
                    self.out_deg[off[f]:off[f + len(lk)]] = lk.sum(2)[valid[:len(lk)]]
                    self.in_deg[off[f + 1]:off[f + 1 + len(lk)]] = lk.sum(1)[valid[1:len(lk) + 1]]
                self.chunk[f:g] = len(self.first)
                self.first.append(f)
                f = g

    def link(self, t: int) -> np.ndarray:
        c = self.chunk[t]
        return self.links[c][t - self.first[c], :self.counts[t], :self.counts[t + 1]]

    def overlap(self, t: int, j: int) -> np.ndarray:
        c = self.chunk[t]
        return self.overlaps[c][t - self.first[c], j, :self.counts[t]]


def _seq_nms_class_cat(boxes: np.ndarray, scores: np.ndarray, counts: np.ndarray, rescore: str,
                       link_iou: float, suppress_iou: float,
                       min_path_score: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`seq_nms_class` on the frames' boxes concatenated: boxes (N, 4), scores (N,), counts (F,)."""
    num_f = len(counts)
    n_all = len(scores)
    new_scores = scores.copy()
    path_ids = np.full(n_all, -1, dtype=np.int64)
    suppressed = np.zeros(n_all, dtype=bool)
    if num_f < 2:
        return ~suppressed, new_scores, path_ids
    blocks = _Blocks(boxes, counts, link_iou, suppress_iou)
    num_links = int(blocks.out_deg.sum())
    if num_links == 0:  # the original stops before the first path
        return ~suppressed, new_scores, path_ids

    off = np.concatenate(([0], np.cumsum(counts)))
    frame_of = np.repeat(np.arange(num_f), counts)
    # Linked boxes (>= 1 link) go into the dynamic programme, compacted per frame; the others wait
    # in a queue. Per-frame arrays below are views into concatenated ones.
    in_dp_all = (blocks.out_deg + blocks.in_deg) > 0
    lin = np.flatnonzero(in_dp_all)
    ccount = np.bincount(frame_of[lin], minlength=num_f)
    coff = np.concatenate(([0], np.cumsum(ccount)))
    pos_all = np.full(n_all, -1, dtype=np.int64)
    pos_all[lin] = np.arange(len(lin)) - coff[frame_of[lin]]
    init_all = scores[lin].copy()         # programme scores; 0 once a box has left the programme
    cout_all = blocks.out_deg[lin]
    cin_all = blocks.in_deg[lin]
    free_all = np.ones(n_all, dtype=bool)  # neither suppressed nor on a path
    o, co = off.tolist(), coff.tolist()
    has = (ccount > 0).tolist()
    free = [free_all[o[t]:o[t + 1]] for t in range(num_f)]
    sup = [suppressed[o[t]:o[t + 1]] for t in range(num_f)]
    in_dp = [in_dp_all[o[t]:o[t + 1]] for t in range(num_f)]
    pos = [pos_all[o[t]:o[t + 1]] for t in range(num_f)]
    lidx = [lin[co[t]:co[t + 1]] - o[t] for t in range(num_f)]
    init = [init_all[co[t]:co[t + 1]] for t in range(num_f)]
    cout = [cout_all[co[t]:co[t + 1]] for t in range(num_f)]
    cin = [cin_all[co[t]:co[t + 1]] for t in range(num_f)]
    cl = [blocks.link(t)[np.ix_(in_dp[t], in_dp[t + 1])] if has[t] and has[t + 1] else None
          for t in range(num_f - 1)]

    # Queue of unlinked boxes, keyed (-score, frame, box) like the original's first-maximum argmax.
    q = np.flatnonzero(~in_dp_all & (scores >= min_path_score))
    q = q[np.lexsort((q, -scores[q]))]
    qf = frame_of[q].tolist()
    qj = (q - off[frame_of[q]]).tolist()
    qs = scores[q].tolist()
    qptr = 0
    late: list = []   # boxes that lost their last link later: heap of (-score, frame, box)

    empty = np.zeros(0)
    a: List[np.ndarray] = [empty] * num_f
    b: List[np.ndarray] = [empty] * num_f
    rowmax = np.full(num_f, -np.inf)

    def recompute(lo, hi):
        for t in range(lo, num_f):
            if not has[t]:
                if t >= hi:
                    break
                continue
            s = init[t]
            if t == 0 or cl[t - 1] is None:
                na, nb = s.copy(), np.full(len(s), -1, dtype=np.int64)
            else:
                cand = np.where(cl[t - 1], a[t - 1][:, None] + s[None, :], -np.inf)
                k = cand.argmax(0)
                best = cand[k, np.arange(len(s))]
                upd = best > s
                na, nb = np.where(upd, best, s), np.where(upd, k, -1)
            same = len(na) == len(a[t]) and bool((na == a[t]).all())
            a[t], b[t] = na, nb
            rowmax[t] = na.max()
            if t >= hi and same:
                break

    recompute(0, num_f - 1)
    n_paths = 0
    while num_links > 0:
        while qptr < len(qf) and not free[qf[qptr]][qj[qptr]]:
            qptr += 1
        while late and not free[late[0][1]][late[0][2]]:
            heapq.heappop(late)
        best = (np.inf,)
        if qptr < len(qf):
            best = (-qs[qptr], qf[qptr], qj[qptr], 0)
        if late and late[0] < best:
            best = late[0] + (1,)
        g = int(rowmax.argmax())
        if rowmax[g] > -np.inf:
            jc = int(a[g].argmax())
            cand = (-float(rowmax[g]), g, int(lidx[g][jc]), 2)
            if cand < best:
                best = cand
        if best[0] == np.inf or -best[0] < min_path_score:
            break
        neg, t_end, j_end, src = best
        total = -neg
        if src == 0:
            qptr += 1
            path = [(t_end, j_end)]
        elif src == 1:
            heapq.heappop(late)
            path = [(t_end, j_end)]
        else:
            path_c = [jc]
            t = g
            while b[t][jc] != -1:
                jc = int(b[t][jc])
                t -= 1
                path_c.append(jc)
            path_c.reverse()
            path = [(t + i, int(lidx[t + i][c])) for i, c in enumerate(path_c)]
        if rescore == 'avg':
            value = total / len(path)
        elif rescore == 'max':
            value = max(scores[o[t] + j] for t, j in path)
        for t, j in path:
            if rescore != 'none':
                new_scores[o[t] + j] = value
            path_ids[o[t] + j] = n_paths
        n_paths += 1
        # suppress the path frames' overlapping boxes; the path boxes and those lose their links
        dirty: List[int] = []    # frames whose programme inputs (scores in it, links into it) changed
        touched: List[int] = []  # frames where a box may have lost its last link
        for t, j in path:
            dels = free[t] & blocks.overlap(t, j)
            dels[j] = True
            free[t][dels] = False
            sup[t] |= dels
            sup[t][j] = False
            if not has[t]:
                continue
            dels &= in_dp[t]
            if not dels.any():
                continue
            in_dp[t][dels] = False
            dc = pos[t][dels]
            init[t][dc] = 0.0
            cout[t][dc] = 0
            cin[t][dc] = 0
            dirty.append(t)
            if t < num_f - 1 and cl[t] is not None:
                lost = cl[t][dc].sum(0)
                if lost.any():
                    num_links -= int(lost.sum())
                    cin[t + 1] -= lost
                    cl[t][dc] = False
                    dirty.append(t + 1)
                    touched.append(t + 1)
            if t > 0 and cl[t - 1] is not None:
                lost = cl[t - 1][:, dc].sum(1)
                if lost.any():
                    num_links -= int(lost.sum())
                    cout[t - 1] -= lost
                    cl[t - 1][:, dc] = False
                    touched.append(t - 1)
        # boxes whose last link went leave the programme for the queue; they had no incoming link,
        # so their programme value was their own score and nothing downstream depended on it
        for t in set(touched):
            gone = (cin[t] == 0) & (cout[t] == 0) & in_dp[t][lidx[t]]
            if gone.any():
                gc = np.flatnonzero(gone)
                in_dp[t][lidx[t][gc]] = False
                init[t][gc] = 0.0
                a[t][gc] = 0.0
                rowmax[t] = a[t].max()
                for j in lidx[t][gc].tolist():
                    if scores[o[t] + j] >= min_path_score:
                        heapq.heappush(late, (-float(scores[o[t] + j]), t, j))
        if dirty:
            recompute(min(dirty), max(dirty))
    return ~suppressed, new_scores, path_ids


def seq_nms_class(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], rescore: str = 'avg',
                  link_iou: float = LINK_IOU, suppress_iou: float = SUPPRESS_IOU,
                  min_path_score: float = MIN_PATH_SCORE) -> Tuple[List[np.ndarray], List[np.ndarray],
                                                                    List[np.ndarray]]:
    """Seq-NMS of one class over one video (FGFA ``maxPath`` for one ``cls_ind``).

    Args:
        boxes: per frame, (n_t, 4) (x1, y1, x2, y2) pixels of this class (n_t may be 0); float64.
        scores: per frame, (n_t,) scores >= 0, same order; float64.
        rescore: ``'avg'`` | ``'max'`` | ``'none'`` (see the module docstring).
        link_iou, suppress_iou, min_path_score: thresholds, defaults as in the original.

    Returns:
        ``(keep, new_scores, path_ids)``, per frame: (n_t,) bool kept (not suppressed), (n_t,) float64
        scores after rescoring (for all boxes; suppressed ones keep their input score), (n_t,) int64
        index of the path the box was taken on (0, 1, ... in the order the paths were found; -1 for
        boxes on no path).
    """
    counts = np.array([len(x) for x in scores], dtype=np.int64)
    cat_b = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes]) if len(boxes) \
        else np.zeros((0, 4))
    cat_s = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores]) if len(scores) \
        else np.zeros(0)
    keep, new, pid = _seq_nms_class_cat(cat_b, cat_s, counts, rescore, link_iou, suppress_iou, min_path_score)
    cuts = np.cumsum(counts)[:-1]
    return np.split(keep, cuts), np.split(new, cuts), np.split(pid, cuts)


def nms_plus1(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS with the +1 pixel convention, as FGFA's ``lib/nms/nms.py`` ``nms`` (py-faster-rcnn).

    Boxes are visited by decreasing score (ties: the later box first, i.e. ``argsort()[::-1]`` of a
    stable sort); each kept box removes the remaining ones whose IoU with it is ``> iou``.

    Args:
        boxes: (n, 4) float64 pixels. scores: (n,). iou: suppression threshold.

    Returns:
        (k,) int64 indices of the kept boxes, ascending.
    """
    order = np.argsort(scores, kind='stable')[::-1]
    ov = iou_plus1(boxes, boxes) > iou
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in order.tolist():
        if alive[i]:
            keep.append(i)
            alive &= ~ov[i]
    return np.sort(np.array(keep, dtype=np.int64))


def seq_nms(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
            rescore: str = 'avg', link_iou: float = LINK_IOU, suppress_iou: float = SUPPRESS_IOU,
            min_path_score: float = MIN_PATH_SCORE,
            frame_nms_iou: Optional[float] = None) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
    """Seq-NMS over one video, every class independently (FGFA ``seq_nms``).

    Args:
        boxes: per frame, (n_t, 4) array (x1, y1, x2, y2), pixels; converted to float64.
        scores: per frame, (n_t,) scores >= 0.
        labels: per frame, (n_t,) integer class indices. Within a class, the input order of a frame is
            the box order used for ties (like the original's per-class arrays).
        rescore, link_iou, suppress_iou, min_path_score: see :func:`seq_nms_class`.
        frame_nms_iou: if given, a per-frame, per-class :func:`nms_plus1` at this IoU on the kept
            boxes afterwards, as FGFA's evaluation does (``lib/dataset/imagenet_vid.py``,
            ``write_vid_results_multiprocess``: 0.3). Default None: Seq-NMS alone (``seq_nms``'s output).

    Returns:
        ``(keep, new_scores, tube_ids)``, per frame: (k_t,) int64 indices of the kept boxes into the
        frame's input, ascending; (k_t,) float64 their scores after rescoring; (k_t,) int64 tube ids.
        Tube ids are unique over the video: first the paths, class by class in increasing label
        order and within a class in the order they were found (decreasing score sum), then every
        kept box that lies on no path as a tube of its own, in (frame, input index) order.

    Raises:
        ValueError: unknown ``rescore`` (callers validate user input; see ``viddet.linking.link_video``).
    """
    if rescore not in RESCORING:
        raise ValueError(f'unknown rescoring {rescore!r}; expected one of {RESCORING}')
    num_f = len(boxes)
    counts = np.array([len(x) for x in scores], dtype=np.int64)
    if num_f == 0:
        return [], [], []
    cat_b = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes])
    cat_s = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores])
    cat_l = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in labels])
    frame_of = np.repeat(np.arange(num_f), counts)
    off = np.concatenate(([0], np.cumsum(counts)))
    order = np.lexsort((np.arange(len(cat_l)), frame_of, cat_l))   # by class, frame, input order
    classes, starts = np.unique(cat_l[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    keep = np.zeros(len(cat_s), dtype=bool)
    out_scores = cat_s.copy()
    tube = np.full(len(cat_s), -1, dtype=np.int64)
    next_id = 0
    for st, en in zip(starts.tolist(), ends.tolist()):
        idx = order[st:en]
        k, s, p = _seq_nms_class_cat(cat_b[idx], cat_s[idx], np.bincount(frame_of[idx], minlength=num_f),
                                     rescore, link_iou, suppress_iou, min_path_score)
        keep[idx] = k
        out_scores[idx] = s
        tube[idx] = np.where(p >= 0, p + next_id, -1)
        next_id += int(p.max()) + 1 if len(p) and p.max() >= 0 else 0
    cuts = np.cumsum(counts)[:-1]
    if frame_nms_iou is not None:
        for t, (k, lab) in enumerate(zip(np.split(keep, cuts), np.split(cat_l, cuts))):
            for c in np.unique(lab[k]).tolist():
                idx = np.flatnonzero(k & (lab == c))
                if len(idx) > 1:
                    k[idx] = False
                    k[idx[nms_plus1(cat_b[off[t] + idx], out_scores[off[t] + idx], frame_nms_iou)]] = True
    lone = keep & (tube < 0)
    tube[lone] = next_id + np.arange(int(lone.sum()))
    kept = [np.flatnonzero(k) for k in np.split(keep, cuts)]
    return (kept, [s[k] for s, k in zip(np.split(out_scores, cuts), kept)],
            [x[k] for x, k in zip(np.split(tube, cuts), kept)])
