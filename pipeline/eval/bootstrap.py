"""Paired image-bootstrap intervals for COCO mAP50-95 and mAP50, and for the difference between two variants' mAPs
scored on the same evaluation images.

Each variant is matched to the ground truth once, by pycocotools (``COCOeval.evaluate``, default parameters). A
bootstrap resample is a vector of integer weights, one per image (multinomial counts: n draws over n images), and its
mAP is a re-implementation of ``COCOeval.accumulate`` + ``summarize`` (stats[0], stats[1]; area 'all', 100
detections) in which every detection and every non-ignored ground-truth box counts with its image's weight. With all
weights 1 it reproduces pycocotools' numbers.

Why a weight w equals w copies of the image. pycocotools concatenates the per-image detections of a category, sorts
them by score (descending, stable mergesort), and walks the list: cumulative true and false positives give a
recall/precision point per detection, precision is replaced by its running maximum from the right (the envelope), and
for each recall threshold r the precision is the envelope at the first point whose recall is >= r. The copies of one
detection in a dataset holding w copies of its image have the same score, so (without ties to other detections) they
are adjacent in the sorted order, and they leave the walk in the state that one detection of weight w leaves it in:
same cumulative counts, same point. The points only they add lie between two points of the weighted walk:

* copies of a true positive add points with lower recall and lower precision than the last copy's point; a recall
  threshold that selects one of them gets the envelope there, which is the envelope at the last copy (its precision
  is no higher), the value the weighted walk gives for that threshold;
* copies of a false positive (or of an ignored detection) add points with the recall of the point before them, so
  the first-point-with-recall->=-r search never selects them, and their precision is below that earlier point's, so
  no envelope value that is read changes.

Zero weights drop a detection out in the same way: its point repeats the one before it. Recall counts the
non-ignored ground truth the same way (sum of weight x per-image count), and a category whose weighted count is 0 is
absent (-1, left out of the mean), as pycocotools does for a category without ground truth.

The one exception: exact score ties between different detections of a category that end up in different images of
the duplicated dataset (ties across images, or within an image of weight > 1). pycocotools orders a tie block by
image, so the copies interleave, where the weighted walk keeps each detection's copies together; the interpolated
precision can then differ slightly. Continuous scores have no ties; scores rounded to a few decimals have some.

Cost. Precision falls at every false positive, so each envelope value that is read is the precision at a true
positive, and the recall thresholds a true positive takes are those between its recall and the previous true
positive's. A resample's sum over recall thresholds is therefore a sum over true positives of envelope x number of
thresholds taken (read from a per-resample table indexed by the weighted true-positive count). Per resample and
category that is one cumulative sum over the detections up to the last true positive and, per IoU threshold, a few
passes over its true positives: no loop over detections or recall thresholds, and many resamples share each numpy
call.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pycocotools.cocoeval import COCOeval

_EPS = np.spacing(1)  # pycocotools' guard in tp / (fp + tp + eps)
_BATCH_ELEMENTS = 1 << 16  # resamples x points per numpy pass: arrays that stay in the CPU cache
_DRAW_CHUNK = 200  # resamples drawn at a time (fixed: the draws for a seed do not depend on the variants)


@dataclass
class _Category:
    """Static arrays of one category with ground truth: its detections in pycocotools' sorted order, cut after the
    last true positive at any IoU threshold (later ones change no value that is read), then a padding detection of
    weight 0 at position D; and per IoU threshold the positions of the true positives and of the ignored
    detections."""

    img: np.ndarray  # (D + 1,) image index of each detection; the padding's is one past the last image
    tp: list[np.ndarray]  # per threshold: positions of the true positives
    ig: list[np.ndarray | None]  # per threshold: D, then the positions of the ignored detections (None: none)
    ig_before: list[np.ndarray | None]  # per threshold: number of ignored detections before each true positive

    @property
    def longest(self) -> int:
        return max([len(r) for r in self.tp] + [len(self.img)])


class Matched:
    """One variant's detections matched to the ground truth, reduced to what re-accumulating the COCO mAP for any
    image weights needs."""

    def __init__(self, image_ids: list[int], npig: np.ndarray, categories: list[_Category], rec_thrs: np.ndarray,
                 n_thrs: int, t50: int) -> None:
        self.image_ids = image_ids
        self._npig = npig  # (I, K) non-ignored ground truth per image and category with ground truth
        self._cats = categories
        self._rec_thrs = rec_thrs
        self._T = n_thrs
        self._t50 = t50

    @classmethod
    def from_coco(cls, gt: dict, dets: list[dict]) -> Matched:
        """Matches COCO results `dets` to the ground-truth dict `gt` (neither is modified) with pycocotools."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = copy.deepcopy(gt)  # pycocotools writes into the ground truth (an 'ignore' flag)
            coco.createIndex()
            if dets:
                res = coco.loadRes([dict(d) for d in dets])  # loadRes adds keys to each result
            else:
                res = COCO()
                res.dataset = {"images": list(coco.dataset.get("images", [])), "annotations": [],
                               "categories": copy.deepcopy(coco.dataset.get("categories", []))}
                res.createIndex()
            e = COCOeval(coco, res, "bbox")
            e.evaluate()
        return cls.from_eval(e)

    @classmethod
    def from_eval(cls, e: COCOeval) -> Matched:
        """Builds from a COCOeval (bbox, default parameters) after its evaluate()."""
        p = e._paramsEval
        if not p.useCats or p.maxDets[-1] != 100 or p.areaRngLbl[0] != "all":
            raise ValueError("needs COCOeval's default parameters (useCats, maxDets ending in 100, area 'all' first)")
        n_img, n_area, n_thrs = len(p.imgIds), len(p.areaRng), len(p.iouThrs)
        t50 = np.where(np.asarray(p.iouThrs) == 0.5)[0]
        if len(t50) != 1:
            raise ValueError("needs an IoU threshold of 0.5")
        max_det = p.maxDets[-1]
        npig_cols, cats = [], []
        for k in range(len(p.catIds)):
            base = k * n_area * n_img  # area range 0 ('all')
            entries = [(i, r) for i in range(n_img) if (r := e.evalImgs[base + i]) is not None]
            npig = np.zeros(n_img)
            for i, r in entries:
                npig[i] = np.count_nonzero(np.asarray(r["gtIgnore"]) == 0)
            if not npig.any():
                continue  # no ground truth under any weights: -1 in pycocotools, never in the mean
            npig_cols.append(npig)
            cats.append(_category(entries, npig, n_thrs, max_det))
        npig = np.stack(npig_cols, axis=1) if npig_cols else np.zeros((n_img, 0))
        return cls([int(i) for i in p.imgIds], npig, cats, np.asarray(p.recThrs, dtype=float), n_thrs, int(t50[0]))

    def score(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """(mAP50-95, mAP50) with image i counted `weights[i]` times (non-negative integers, in `image_ids` order);
        None: once each."""
        w = np.ones(len(self.image_ids), dtype=np.int64) if weights is None else np.asarray(weights)
        if w.shape != (len(self.image_ids),):
            raise ValueError(f"weights must have shape ({len(self.image_ids)},), got {w.shape}")
        a, b = self.score_many(w[None])[0]
        return float(a), float(b)

    def score_many(self, weights: np.ndarray) -> np.ndarray:
        """(B, 2) array of (mAP50-95, mAP50) for a (B, images) array of non-negative integer image weights; -1
        where no category has ground truth under the weights (as pycocotools)."""
        w = np.asarray(weights)
        if w.ndim != 2 or w.shape[1] != len(self.image_ids):
            raise ValueError(f"weights must have shape (B, {len(self.image_ids)}), got {w.shape}")
        wi = w.astype(np.int64)
        if not np.array_equal(wi, w) or (wi < 0).any():
            raise ValueError("weights must be non-negative integers")
        n_rec = len(self._rec_thrs)
        npig = wi @ self._npig  # (B, K)
        valid = npig > 0
        total = np.zeros(len(w))
        total50 = np.zeros(len(w))
        wx = np.concatenate([wi, np.zeros((len(w), 1), dtype=np.int64)], axis=1)  # a last image of weight 0
        for k, c in enumerate(self._cats):
            step = max(1, _BATCH_ELEMENTS // c.longest)
            for s in range(0, len(w), step):
                seg = self._segment_sums(c, wx[s:s + step], npig[s:s + step, k])  # (b, T)
                seg = np.where(valid[s:s + step, k, None], seg, 0.0)
                total[s:s + step] += seg.sum(axis=1)
                total50[s:s + step] += seg[:, self._t50]
        n = valid.sum(axis=1)
        has = n > 0
        m = np.where(has, total / (self._T * n_rec * np.maximum(n, 1)), -1.0)
        m50 = np.where(has, total50 / (n_rec * np.maximum(n, 1)), -1.0)
        return np.stack([m, m50], axis=1)

    def _segment_sums(self, c: _Category, wx: np.ndarray, npig: np.ndarray) -> np.ndarray:
        """Sum over recall thresholds of the interpolated precision, per resample and IoU threshold: (b, T)."""
        b = len(wx)
        out = np.zeros((b, self._T))
        if not any(len(r) for r in c.tp):
            return out  # no true positive: precision 0 at every recall threshold
        dw = wx[:, c.img]  # (b, D + 1) detection weights; the last column is 0 (the padding's)
        cw = np.cumsum(dw, axis=1)
        # recall thresholds reached with x true positives (recall x / npig), for every x up to the largest npig
        width = int(npig.max()) + 1
        reached = np.searchsorted(self._rec_thrs, np.arange(width) / np.where(npig > 0, npig, 1)[:, None], "right")
        reached = reached.ravel().astype(float)
        offset = (np.arange(b) * width)[:, None]
        for t, pos in enumerate(c.tp):
            if not len(pos):
                continue
            tp = np.cumsum(dw[:, pos], axis=1)  # (b, n) weighted true positives up to each true positive
            counted = cw[:, pos]  # weight of the detections up to it, less the ignored ones: fp + tp
            if c.ig[t] is not None:
                counted = counted - np.cumsum(dw[:, c.ig[t]], axis=1)[:, c.ig_before[t]]
            pr = tp / (counted + _EPS)  # pycocotools' tp / (fp + tp + eps), fp + tp being exact integers
            env = np.fmax.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # no NaN here; fmax runs faster than maximum
            r = reached[tp + offset] if b > 1 else reached[tp]
            taken = np.diff(r, axis=1, prepend=0)  # the thresholds whose first point with recall >= them is this
            out[:, t] = np.einsum("bn,bn->b", env, taken)
        return out


def _category(entries: list, npig: np.ndarray, n_thrs: int, max_det: int) -> _Category:
    """A category's static arrays from its evalImgs entries ((image index, entry), in evalImgs order) and its
    non-ignored ground truth per image."""
    scores = np.concatenate([np.asarray(r["dtScores"][0:max_det], dtype=float) for _, r in entries] + [np.zeros(0)])
    img = np.concatenate([np.full(len(r["dtScores"][0:max_det]), i, dtype=np.intp) for i, r in entries]
                         + [np.zeros(0, dtype=np.intp)])
    dtm = np.concatenate([np.asarray(r["dtMatches"])[:, 0:max_det] for _, r in entries] + [np.zeros((n_thrs, 0))],
                         axis=1)
    dtig = np.concatenate([np.asarray(r["dtIgnore"])[:, 0:max_det] for _, r in entries] + [np.zeros((n_thrs, 0))],
                          axis=1)
    order = np.argsort(-scores, kind="mergesort")
    img, dtm, dtig = img[order], dtm[:, order], dtig[:, order].astype(bool)
    tps = np.logical_and(dtm, np.logical_not(dtig))
    has_tp = tps.any(axis=0)
    end = int(np.nonzero(has_tp)[0][-1]) + 1 if has_tp.any() else 0  # later detections change no value read
    img, tps, dtig = img[:end], tps[:, :end], dtig[:, :end]
    tp = [np.nonzero(row)[0] for row in tps]
    for pos in tp:  # weighted recall indexes a table up to the weighted ground-truth count
        if (np.bincount(img[pos], minlength=len(npig)) > npig).any():
            raise ValueError("more true positives than ground truth on an image: not COCOeval's default matching")
    ig: list[np.ndarray | None] = [None] * n_thrs
    ig_before: list[np.ndarray | None] = [None] * n_thrs
    for t in range(n_thrs):
        rows = np.nonzero(dtig[t])[0]
        if len(rows):
            ig[t] = np.r_[end, rows]
            ig_before[t] = np.searchsorted(rows, tp[t])
    return _Category(np.r_[img, len(npig)], tp, ig, ig_before)


def _draws(n: int, resamples: int, seed: int):
    """Multinomial image counts (n draws over n images), `_DRAW_CHUNK` resamples at a time."""
    rng = np.random.default_rng(seed)
    for s in range(0, resamples, _DRAW_CHUNK):
        b = min(_DRAW_CHUNK, resamples - s)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def _interval(x: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def intervals(matched: dict[str, Matched], pairs: list[tuple[str, str]], resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of each variant's mAP50-95 and mAP50 and of the differences `a - b` for each
    (a, b) in `pairs`, resampling images with the same draws for every variant (paired). Resamples in which no
    category has ground truth (mAP undefined) are left out of every distribution and counted in
    `dropped_resamples`."""
    if not matched:
        raise ValueError("no variants")
    names = list(matched)
    ids = matched[names[0]].image_ids
    for name in names[1:]:
        if matched[name].image_ids != ids:
            raise ValueError(f"variant {name!r} was scored on other images than {names[0]!r}")
    for a, b in pairs:
        for x in (a, b):
            if x not in matched:
                raise ValueError(f"pair ({a!r}, {b!r}) names an unknown variant {x!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 2:
        raise ValueError(f"needs at least 2 resamples, got {resamples}")
    point = {name: matched[name].score() for name in names}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for w in _draws(len(ids), resamples, seed):
        for name in names:
            chunks[name].append(matched[name].score_many(w))
    boot = {name: np.concatenate(chunks[name]) for name in names}  # (resamples, 2)
    ok = np.all([(boot[name] >= 0).all(axis=1) for name in names], axis=0)
    boot = {name: x[ok] for name, x in boot.items()}
    if not ok.any():
        raise ValueError("no resample has ground truth")
    variants = {}
    for name in names:
        (m, m50), x = point[name], boot[name]
        variants[name] = {"map50_95": m, "map50_95_ci": _interval(x[:, 0], level),
                          "map50": m50, "map50_ci": _interval(x[:, 1], level)}
    deltas = {}
    for a, b in pairs:
        d = boot[a] - boot[b]
        sd = d.std(axis=0, ddof=1) if len(d) > 1 else np.full(2, np.nan)
        deltas[f"{a} - {b}"] = {"a": a, "b": b,
                                "map50_95": point[a][0] - point[b][0], "map50_95_ci": _interval(d[:, 0], level),
                                "map50_95_se": float(sd[0]),
                                "map50": point[a][1] - point[b][1], "map50_ci": _interval(d[:, 1], level),
                                "map50_se": float(sd[1])}
    return {"method": "paired image bootstrap, percentile intervals; COCO matching once per variant (pycocotools), "
                      "accumulate re-run with per-image weights",
            "resamples": resamples, "seed": seed, "level": level, "unit": "image", "images": len(ids),
            "dropped_resamples": int((~ok).sum()), "variants": variants, "deltas": deltas}


def fp32_source(row: dict) -> str | None:
    """The FP32 variant a lower-precision row was made from (the row's `fp32_source`, from the variant table:
    pruned-int8 -> pruned-fp32), None for FP32 rows and end-to-end ones (their detections are their source's)."""
    if row.get("precision", "fp32") == "fp32" or row.get("e2e"):
        return None
    return row.get("fp32_source")


def annotate_rows(rows: list[dict], gt: dict, dets: dict[str, list[dict]], resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Adds the intervals to bench rows in place: `map50_95_ci` / `map50_ci` per row, `vs_base.map50_95_delta_ci`
    (and mAP50's) against the row's base, and `vs_fp32` (the delta to the FP32 model a quantized row was made from,
    with its interval). `dets` holds each row's COCO results. Returns the method summary for the report."""
    matched = {r["name"]: Matched.from_coco(gt, dets[r["name"]]) for r in rows}
    names = set(matched)
    pairs = set()
    for r in rows:
        base = (r.get("vs_base") or {}).get("against")
        if base in names and base != r["name"]:
            pairs.add((r["name"], base))
        src = fp32_source(r)
        if src in names:
            pairs.add((r["name"], src))
    res = intervals(matched, sorted(pairs), resamples=resamples, seed=seed, level=level)
    for r in rows:
        v = res["variants"][r["name"]]
        r["map50_95_ci"], r["map50_ci"] = v["map50_95_ci"], v["map50_ci"]
        vb = r.get("vs_base")
        d = res["deltas"].get(f"{r['name']} - {(vb or {}).get('against')}")
        if vb is not None and d is not None:
            vb.update({"map50_95_delta_ci": d["map50_95_ci"], "map50_95_delta_se": d["map50_95_se"],
                       "map50_delta": d["map50"], "map50_delta_ci": d["map50_ci"]})
        elif vb is not None and vb.get("against") == r["name"]:
            vb.update({"map50_95_delta_ci": [0.0, 0.0], "map50_delta": 0.0, "map50_delta_ci": [0.0, 0.0]})
        src = fp32_source(r)
        d = res["deltas"].get(f"{r['name']} - {src}")
        if d is not None:
            r["vs_fp32"] = {"against": src, "map50_95_delta": d["map50_95"], "map50_95_delta_ci": d["map50_95_ci"],
                            "map50_95_delta_se": d["map50_95_se"], "map50_delta": d["map50"],
                            "map50_delta_ci": d["map50_ci"]}
    return {k: res[k] for k in ("method", "resamples", "seed", "level", "unit", "images", "dropped_resamples")}
