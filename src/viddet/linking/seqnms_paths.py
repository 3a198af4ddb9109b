"""Seq-NMS of one class, incrementally (the algorithm and its exact semantics are described in
:mod:`viddet.linking.seqnms`).

* :class:`_Blocks`: the links between consecutive frames and the overlaps within frames, from
  vectorised IoU over padded chunks of frames.
* :class:`_PathSearch`: the search state. The dynamic programme over *linked* boxes, one numpy step
  per frame, recomputed after a path only from the frames whose scores or links changed; the
  score-sorted queue of unlinked boxes (single-box paths); and the suppression after each path.
* :func:`seq_nms_paths`: the loop that takes the best path, rescores it and suppresses around it
  until the best path sum falls below ``min_path_score``.
"""
from __future__ import annotations

import heapq
from typing import List, Optional, Tuple

import numpy as np

from viddet.linking.iou import iou_pairs

_CHUNK = 20_000  # box pairs per vectorised IoU pass: small enough for the temporaries to stay in cache


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
                self.overlaps.append(iou_pairs(pad[:g - f, :, None, :], pad[:g - f, None, :, :]) >= suppress_iou)
                lk = iou_pairs(pad[:h - f - 1, :, None, :], pad[1:h - f, None, :, :]) >= link_iou
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

def seq_nms_paths(boxes: np.ndarray, scores: np.ndarray, counts: np.ndarray, rescore: str,
                  link_iou: float, suppress_iou: float,
                  min_path_score: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`viddet.linking.seqnms.seq_nms_class` on the frames' boxes concatenated.

    Args:
        boxes: (N, 4) float64 (x1, y1, x2, y2) pixels, frame after frame. scores: (N,) float64 >= 0.
        counts: (F,) int64 boxes per frame (sum N).
        rescore, link_iou, suppress_iou, min_path_score: as :func:`~viddet.linking.seqnms.seq_nms_class`.

    Returns:
        ``(keep, new_scores, path_ids)``: (N,) bool, (N,) float64, (N,) int64, concatenated like the input.
    """
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
    search = _PathSearch(blocks, scores, counts, suppressed, num_links, min_path_score)
    o = search.o
    n_paths = 0
    while search.num_links > 0:
        found = search.next_path()
        if found is None:
            break
        total, path = found
        if rescore == 'avg':
            value = total / len(path)
        elif rescore == 'max':
            value = max(scores[o[t] + j] for t, j in path)
        for t, j in path:
            if rescore != 'none':
                new_scores[o[t] + j] = value
            path_ids[o[t] + j] = n_paths
        n_paths += 1
        search.remove(path)
    return ~suppressed, new_scores, path_ids


class _PathSearch:
    """What stays of one class between paths: the dynamic programme over the linked boxes, the queue
    of unlinked boxes, and which boxes are free (neither suppressed nor on a path).

    Linked boxes (>= 1 link) are in the programme, compacted per frame (``lidx[t]``: their indices in
    frame t; ``pos[t]``: a box's compact index); per-frame arrays are views into concatenated ones,
    and ``suppressed`` (the caller's (N,) array) is filled in through the views ``sup``."""

    def __init__(self, blocks: _Blocks, scores: np.ndarray, counts: np.ndarray, suppressed: np.ndarray,
                 num_links: int, min_path_score: float):
        num_f = len(counts)
        n_all = len(scores)
        self.num_f, self.num_links, self.min_path_score, self.scores = num_f, num_links, min_path_score, scores
        self.blocks = blocks
        off = np.concatenate(([0], np.cumsum(counts)))
        frame_of = np.repeat(np.arange(num_f), counts)
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
        self.o = o
        self.has = (ccount > 0).tolist()
        self.free = [free_all[o[t]:o[t + 1]] for t in range(num_f)]
        self.sup = [suppressed[o[t]:o[t + 1]] for t in range(num_f)]
        self.in_dp = [in_dp_all[o[t]:o[t + 1]] for t in range(num_f)]
        self.pos = [pos_all[o[t]:o[t + 1]] for t in range(num_f)]
        self.lidx = [lin[co[t]:co[t + 1]] - o[t] for t in range(num_f)]
        self.init = [init_all[co[t]:co[t + 1]] for t in range(num_f)]
        self.cout = [cout_all[co[t]:co[t + 1]] for t in range(num_f)]
        self.cin = [cin_all[co[t]:co[t + 1]] for t in range(num_f)]
        self.cl = [blocks.link(t)[np.ix_(self.in_dp[t], self.in_dp[t + 1])] if self.has[t] and self.has[t + 1]
                   else None for t in range(num_f - 1)]

        # Queue of unlinked boxes, keyed (-score, frame, box) like the original's first-maximum argmax.
        q = np.flatnonzero(~in_dp_all & (scores >= min_path_score))
        q = q[np.lexsort((q, -scores[q]))]
        self.qf = frame_of[q].tolist()
        self.qj = (q - off[frame_of[q]]).tolist()
        self.qs = scores[q].tolist()
        self.qptr = 0
        self.late: list = []   # boxes that lost their last link later: heap of (-score, frame, box)

        empty = np.zeros(0)
        self.a: List[np.ndarray] = [empty] * num_f     # best path sum ending at each linked box
        self.b: List[np.ndarray] = [empty] * num_f     # its predecessor in the frame before, or -1
        self.rowmax = np.full(num_f, -np.inf)
        self.recompute(0, num_f - 1)

    def recompute(self, lo: int, hi: int) -> None:
        """Recomputes the programme from frame ``lo``: at least up to frame ``hi``, then on while the
        values of a frame change."""
        a, b, rowmax, init, cl, has = self.a, self.b, self.rowmax, self.init, self.cl, self.has
        for t in range(lo, self.num_f):
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

    def next_path(self) -> Optional[Tuple[float, List[Tuple[int, int]]]]:
        """The best remaining path, ``(score sum, [(frame, box index in the frame), ...])`` in frame
        order, taken off the queue it came from; None when the best sum is below ``min_path_score``
        or nothing is left. Ties: the first maximum in (frame, box) order, as the original."""
        qf, qj, qs, late, free, rowmax = self.qf, self.qj, self.qs, self.late, self.free, self.rowmax
        while self.qptr < len(qf) and not free[qf[self.qptr]][qj[self.qptr]]:
            self.qptr += 1
        while late and not free[late[0][1]][late[0][2]]:
            heapq.heappop(late)
        best = (np.inf,)
        if self.qptr < len(qf):
            best = (-qs[self.qptr], qf[self.qptr], qj[self.qptr], 0)
        if late and late[0] < best:
            best = late[0] + (1,)
        g = int(rowmax.argmax())
        if rowmax[g] > -np.inf:
            jc = int(self.a[g].argmax())
            cand = (-float(rowmax[g]), g, int(self.lidx[g][jc]), 2)
            if cand < best:
                best = cand
        if best[0] == np.inf or -best[0] < self.min_path_score:
            return None
        neg, t_end, j_end, src = best
        total = -neg
        if src == 0:
            self.qptr += 1
            return total, [(t_end, j_end)]
        if src == 1:
            heapq.heappop(late)
            return total, [(t_end, j_end)]
        b = self.b
        path_c = [jc]
        t = g
        while b[t][jc] != -1:
            jc = int(b[t][jc])
            t -= 1
            path_c.append(jc)
        path_c.reverse()
        return total, [(t + i, int(self.lidx[t + i][c])) for i, c in enumerate(path_c)]

    def remove(self, path: List[Tuple[int, int]]) -> None:
        """Takes ``path`` out: suppresses the boxes of its frames that overlap the path box, removes
        their links and the path boxes' links, moves boxes left without links to the queue, and
        recomputes the programme where it changed."""
        free, sup, in_dp, pos, init, cout, cin, cl, has = (self.free, self.sup, self.in_dp, self.pos, self.init,
                                                           self.cout, self.cin, self.cl, self.has)
        dirty: List[int] = []    # frames whose programme inputs (scores in it, links into it) changed
        touched: List[int] = []  # frames where a box may have lost its last link
        for t, j in path:
            dels = free[t] & self.blocks.overlap(t, j)
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
            if t < self.num_f - 1 and cl[t] is not None:
                lost = cl[t][dc].sum(0)
                if lost.any():
                    self.num_links -= int(lost.sum())
                    cin[t + 1] -= lost
                    cl[t][dc] = False
                    dirty.append(t + 1)
                    touched.append(t + 1)
            if t > 0 and cl[t - 1] is not None:
                lost = cl[t - 1][:, dc].sum(1)
                if lost.any():
                    self.num_links -= int(lost.sum())
                    cout[t - 1] -= lost
                    cl[t - 1][:, dc] = False
                    touched.append(t - 1)
        self._requeue(touched)
        if dirty:
            self.recompute(min(dirty), max(dirty))

    def _requeue(self, touched: List[int]) -> None:
        """Boxes whose last link went leave the programme for the queue; they had no incoming link,
        so their programme value was their own score and nothing downstream depended on it."""
        o, lidx, in_dp, a, scores = self.o, self.lidx, self.in_dp, self.a, self.scores
        for t in set(touched):
            gone = (self.cin[t] == 0) & (self.cout[t] == 0) & in_dp[t][lidx[t]]
            if gone.any():
                gc = np.flatnonzero(gone)
                in_dp[t][lidx[t][gc]] = False
                self.init[t][gc] = 0.0
                a[t][gc] = 0.0
                self.rowmax[t] = a[t].max()
                for j in lidx[t][gc].tolist():
                    if scores[o[t] + j] >= self.min_path_score:
                        heapq.heappush(self.late, (-float(scores[o[t] + j]), t, j))
