"""Build a SYNTHETIC small-defect dev set in MVTec-AD layout from the good images of one category, outside the repo.

    python bench/small_defects_layout.py --src ../shared/datasets/mvtec/bottle --out /tmp/ds/bottle_small \\
        [--seed 0] [--n-test-good 40] [--n-defect 60]

- good pool: ``SRC/train/good`` + ``SRC/test/good`` (``SRC/test/<defect>`` is ignored), split with
  ``numpy.random.default_rng(seed)`` into ``train/good`` (symlinks to the originals), ``test/good``
  (``--n-test-good`` held-out goods, symlinks) and ``--n-defect`` other held-out goods that get one synthetic
  defect each: ``test/<type>/NNN.png`` + ``ground_truth/<type>/NNN_mask.png`` (0/255, image size).
  Symlinks are named ``<origin>_<name>`` (origin ``train`` / ``test``: MVTec reuses file names across folders).
- defect types, round-robin (equal numbers), each well under 1 % of the image, placed on the product
  (foreground = pixels that differ from a smooth background fitted to the image border; a frame-filling
  texture counts as foreground everywhere); sizes are fractions of the short image side ``s``:
  ``scratch``: anti-aliased, slightly curved polyline, 4-10 % of ``s`` long, 1-3 px wide at 1024 px
  (>= 1 px), 25-60 grey levels brighter or darker; ``spot``: irregular soft-edged blob (thresholded blurred
  noise), radius 0.4-1.2 % of ``s``, 30-80 levels darker or lighter (colour images: a tinted shift);
  ``patch``: square or rotated rectangle, 2-4 % of ``s``, cut from a different image of the output train/good at another
  position and pasted with a 1-2 px feathered edge (CutPaste-style).
- ``SYNTHETIC.txt`` (what this is, how it was made, seed, source and its PROVENANCE.txt first lines),
  ``defects.csv`` (``file,type,covered_fraction,x0,y0,x1,y1``; mask pixels / image pixels; box inclusive)
  and ``sources.csv`` (``file,source,donor,on_product,contrast``).

Prints one JSON line: out folder, seed, counts per folder, median / max covered fraction per type.
Deterministic: the same arguments give byte-identical outputs. Refuses to write inside the repo.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TYPES = ("scratch", "spot", "patch")
EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_ALPHA = 0.25  # a pixel is in the mask where the defect's blend weight exceeds this
FG_SIDE = 256  # foreground estimate runs on a copy downscaled to this side
MAX_FRACTION = 0.01


# ----------------------------------------------------------------------------- images, foreground
def read_image(p: Path) -> np.ndarray:
    im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise SystemExit(f"{p}: cannot read the image")
    if im.dtype != np.uint8:
        raise SystemExit(f"{p}: {im.dtype} image, only 8-bit images are supported")
    if im.ndim == 3 and im.shape[2] == 4:
        im = cv2.cvtColor(im, cv2.COLOR_BGRA2BGR)
    if im.ndim == 3 and im.shape[2] == 1:
        im = im[:, :, 0]
    return im


def as_mode(im: np.ndarray, colour: bool) -> np.ndarray:
    if colour and im.ndim == 2:
        return cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    if not colour and im.ndim == 3:
        return cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)
    return im


def grey(im: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(im, cv2.COLOR_BGR2GRAY) if im.ndim == 3 else im


def foreground(im: np.ndarray) -> tuple[np.ndarray, bool]:
    """(bool mask of the product, whole_image). Background = quadratic surface fitted to the border strip."""
    h, w = im.shape[:2]
    f = min(1.0, FG_SIDE / max(h, w))
    g = grey(im)
    if f < 1.0:
        g = cv2.resize(g, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    g = cv2.GaussianBlur(g.astype(np.float32), (0, 0), 1.5)
    sh, sw = g.shape
    b = max(2, round(0.03 * min(sh, sw)))
    border = np.zeros((sh, sw), bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    xx, yy = xx / sw - 0.5, yy / sh - 0.5
    design = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1)
    a, v = design[border], g[border]
    keep = np.ones(len(v), bool)
    for _ in range(2):  # one robust re-fit without the border pixels that belong to the object
        coef = np.linalg.lstsq(a[keep].astype(np.float64), v[keep].astype(np.float64), rcond=None)[0]
        res = v - a @ coef
        mad = float(np.median(np.abs(res[keep] - np.median(res[keep]))))
        keep = np.abs(res) <= max(3.0, 4 * 1.4826 * mad)
    sigma = 1.4826 * mad
    resid = np.abs(g - (design @ coef).astype(np.float32))
    # noise floor of the border, and a fraction of the object's contrast (drops soft halos and shadows)
    fg = resid > max(8.0, 5 * sigma, 0.45 * float(np.percentile(resid, 99.5)))
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    fg = np.isin(lab, [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 0.01 * sh * sw])
    # fill holes (object parts as bright / dark as the background), then keep off the object's soft outline
    n, lab = cv2.connectedComponents((~fg).astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fg |= ~np.isin(lab, edge)
    e = 2 * max(1, round(0.01 * min(sh, sw))) + 1
    fg = cv2.erode(fg.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (e, e))).astype(bool)
    frac = float(fg.mean())
    # a texture that fills the frame: the border itself is not a flat background, or nearly all is "object"
    if sigma > 6.0 or frac > 0.85 or frac < 0.005:
        return np.ones((h, w), bool), True
    return cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool), False


# ----------------------------------------------------------------------------- defect shapes (local alpha windows)
SS = 4  # supersampling of drawn shapes


def _downsample(canvas: np.ndarray, n: int) -> np.ndarray:
    return cv2.resize(canvas.astype(np.float32) / 255.0, (n, n), interpolation=cv2.INTER_AREA)


def _to_ss(pts: np.ndarray) -> np.ndarray:
    """local continuous pixel coords (pixel i spans [i, i+1)) -> cv2 fixed-point (shift 4) supersampled coords"""
    return np.round((pts * SS - 0.5) * 16).astype(np.int32)


def scratch_alpha(rng: np.random.Generator, s: int) -> tuple[np.ndarray, dict]:
    length = max(5.0, rng.uniform(0.04, 0.10) * s)
    width = max(1.0, rng.uniform(1.0, 3.0) * s / 1024)
    bend = rng.uniform(-0.6, 0.6)  # total change of heading along the line (rad): slightly curved
    theta = rng.uniform(0, math.pi)
    t = np.linspace(0, 1, 9)
    heading = theta + bend * (t - 0.5)
    step = length / (len(t) - 1)
    pts = np.zeros((len(t), 2))
    pts[1:, 0] = np.cumsum(step * np.cos(heading[:-1]))
    pts[1:, 1] = np.cumsum(step * np.sin(heading[:-1]))
    pts -= pts.mean(0)
    r = math.ceil(length / 2 + width + 3)
    n = 2 * r + 1
    canvas = np.zeros((n * SS, n * SS), np.uint8)
    cv2.polylines(canvas, [_to_ss(pts + r + 0.5)], False, 255, max(1, round(width * SS)), cv2.LINE_AA, 4)
    return _downsample(canvas, n), {"length_px": length, "width_px": width}


def spot_alpha(rng: np.random.Generator, s: int) -> tuple[np.ndarray, dict]:
    rad = max(2.0, rng.uniform(0.004, 0.012) * s)
    r = math.ceil(2 * rad + 3)
    n = 2 * r + 1
    noise = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), max(0.6, rad / 2.5))
    noise /= float(noise.std()) + 1e-6
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - r
    field = 1.0 - (xx * xx + yy * yy) / (rad * rad) + 0.45 * noise
    blob = (field > 0).astype(np.uint8)
    blob[r, r] = 1
    _, lab = cv2.connectedComponents(blob, connectivity=8)
    blob = (lab == lab[r, r]).astype(np.float32)
    alpha = cv2.GaussianBlur(blob, (0, 0), max(0.6, 0.2 * rad))
    return np.clip(alpha / float(alpha.max()), 0, 1), {"radius_px": rad}


def patch_alpha(rng: np.random.Generator, s: int) -> tuple[np.ndarray, dict]:
    a = max(4.0, rng.uniform(0.02, 0.04) * s)
    if rng.random() < 0.5:
        pw, ph, angle = a, a, 0.0
    else:
        pw, ph, angle = a, a / rng.uniform(1.3, 2.0), rng.uniform(0, 180)
    feather = rng.uniform(1.0, 2.0)
    r = math.ceil(a / 2 * math.sqrt(2) + 2 * feather + 2)
    n = 2 * r + 1
    box = cv2.boxPoints(((r + 0.5, r + 0.5), (pw, ph), angle))
    canvas = np.zeros((n * SS, n * SS), np.uint8)
    cv2.fillPoly(canvas, [_to_ss(box)], 255, cv2.LINE_AA, 4)
    alpha = cv2.GaussianBlur(_downsample(canvas, n), (0, 0), feather / 2.5)
    return np.clip(alpha, 0, 1), {"size_px": a, "feather_px": feather}


SHAPES = {"scratch": scratch_alpha, "spot": spot_alpha, "patch": patch_alpha}


# ----------------------------------------------------------------------------- placement and blending
def centres(fg: np.ndarray, r: int) -> np.ndarray:
    h, w = fg.shape
    inner = np.zeros_like(fg)
    if h > 2 * r and w > 2 * r:
        inner[r:h - r, r:w - r] = fg[r:h - r, r:w - r]
    return np.flatnonzero(inner)


def place(rng: np.random.Generator, fg: np.ndarray, mask_local: np.ndarray, what: str, tries: int = 40):
    """a centre (y, x) whose defect mask lies (>= 98 %) on the foreground; the best of ``tries`` otherwise"""
    r = mask_local.shape[0] // 2
    cand = centres(fg, r)
    if cand.size == 0:
        raise SystemExit(f"{what}: image too small for a {2 * r + 1} px defect window")
    n_mask = max(1, int(mask_local.sum()))
    best, best_in = None, -1.0
    w = fg.shape[1]
    for _ in range(tries):
        i = int(cand[rng.integers(cand.size)])
        cy, cx = divmod(i, w)
        inside = float(fg[cy - r:cy + r + 1, cx - r:cx + r + 1][mask_local].sum()) / n_mask
        if inside > best_in:
            best, best_in = (cy, cx), inside
        if inside >= 0.98:
            break
    return best, best_in


def shift_delta(rng: np.random.Generator, lo: float, hi: float, base: float, colour: bool, tint: bool):
    """a signed intensity change of lo..hi levels, flipped when the region has no room in that direction"""
    amp = rng.uniform(lo, hi)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    w = 1.0 + (0.4 * rng.uniform(-1, 1, 3) if tint else 0.0)
    if (sign < 0 and base - amp < 15) or (sign > 0 and base + amp > 240):
        sign = -sign
    d = sign * amp * (np.asarray(w, np.float32) / float(np.mean(w)) if colour else np.float32(1.0))
    return np.asarray(d, np.float32), sign * amp


def add_defect(rng, kind: str, img: np.ndarray, fg: np.ndarray, donors: list[Path], colour: bool, what: str):
    h, w = img.shape[:2]
    s = min(h, w)
    best = None
    for _ in range(4):  # a new shape (size, orientation) when none of the tried positions keeps it on the product
        alpha, info = SHAPES[kind](rng, s)
        mask_local = alpha > MASK_ALPHA
        centre, inside = place(rng, fg, mask_local, what)
        if best is None or inside > best[3]:
            best = (alpha, info, mask_local, inside, centre)
        if inside >= 0.98:
            break
    alpha, info, mask_local, inside, (cy, cx) = best
    r = alpha.shape[0] // 2
    ys, xs = slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1)
    win = img[ys, xs].astype(np.float32)
    a = alpha[:, :, None] if img.ndim == 3 else alpha
    donor_name = ""
    if kind == "patch":
        # CutPaste: the same-shaped window from another image, at another position on its product; take the
        # most contrasting of a few tries so the pasted texture is visibly foreign
        best = None
        for _ in range(12):
            dp = donors[int(rng.integers(len(donors)))]
            dimg = as_mode(read_image(dp), colour)
            dfg, _ = foreground(dimg)
            cand = centres(dfg, r)
            if cand.size == 0:
                continue
            dy, dx = divmod(int(cand[rng.integers(cand.size)]), dimg.shape[1])
            if dimg.shape[:2] == img.shape[:2] and math.hypot(dy - cy, dx - cx) < 2 * info["size_px"]:
                continue
            dwin = dimg[dy - r:dy + r + 1, dx - r:dx + r + 1].astype(np.float32)
            diff = float(np.abs(dwin - win)[mask_local].mean())
            if best is None or diff > best[0]:
                best = (diff, dwin, dp, (dx, dy))
            if diff >= 20:
                break
        if best is None:
            raise SystemExit(f"{what}: no donor window found for a patch")
        diff, dwin, dp, (dx, dy) = best
        out = win + a * (dwin - win)
        donor_name, info = str(dp), {**info, "donor_xy": (dx, dy), "mean_abs_diff": diff}
    else:
        base = float(grey(img[ys, xs])[mask_local].mean())
        if kind == "scratch":
            delta, signed = shift_delta(rng, 25, 60, base, colour, tint=False)
        else:
            delta, signed = shift_delta(rng, 30, 80, base, colour, tint=True)
        out = win + a * delta
        info = {**info, "delta": signed}
    res = img.copy()
    res[ys, xs] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[ys, xs][mask_local] = 255
    info["on_foreground"] = inside
    return res, mask, donor_name, info


# ----------------------------------------------------------------------------- data set
def good_pool(src: Path) -> tuple[list[tuple[str, Path]], dict[str, int]]:
    pool, per = [], {}
    for origin in ("train", "test"):
        d = src / origin / "good"
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTS) if d.is_dir() else []
        per[f"{origin}/good"] = len(files)
        pool += [(origin, p) for p in files]
    return pool, per


def provenance(src: Path, pool: list[tuple[str, Path]]) -> tuple[Path | None, list[str]]:
    """PROVENANCE.txt of SRC or a folder above it; else of the folder the (symlinked) goods point to"""
    starts = [src]
    if pool and pool[0][1].is_symlink():
        starts.append(pool[0][1].resolve().parent)
    for start in starts:
        for d in [start, *list(start.parents)[:3]]:
            p = d / "PROVENANCE.txt"
            if p.is_file():
                lines = []
                for line in p.read_text(errors="replace").splitlines():
                    if not line.strip() or len(lines) >= 15:
                        break
                    lines.append(line)
                return p, lines
    return None, []


def build(src: Path, out: Path, seed: int = 0, n_test_good: int = 40, n_defect: int = 60) -> dict:
    src, out = src.resolve(), out.resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"{out}: refusing to write the data set inside the repository ({REPO})")
    if out == src or src in out.parents or out in src.parents:
        raise SystemExit(f"{out}: refusing to write the data set inside / over its source ({src})")
    pool, per = good_pool(src)
    need = n_test_good + n_defect
    if len(pool) <= need:
        raise SystemExit(
            f"{src}: good pool has {len(pool)} images (train/good {per['train/good']} + test/good "
            f"{per['test/good']}), need more than --n-test-good {n_test_good} + --n-defect {n_defect} = {need} "
            "(at least one left for train/good)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pool)).tolist()
    test_good, defect, train = perm[:n_test_good], perm[n_test_good:need], sorted(perm[need:])
    colour = read_image(pool[0][1]).ndim == 3
    if out.exists():
        shutil.rmtree(out)
    counts: dict[str, int] = {}

    def link(i: int, sub: str) -> None:
        origin, p = pool[i]
        dest = out / sub / f"{origin}_{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), dest)
        counts[sub] = counts.get(sub, 0) + 1

    for i in train:
        link(i, "train/good")
    for i in sorted(test_good):
        link(i, "test/good")
    donors = [pool[i][1] for i in train]
    rows, srcs, n_whole = [], [], 0
    per_type: dict[str, int] = {}
    for j, i in enumerate(defect):
        kind = TYPES[j % len(TYPES)]
        k = per_type.get(kind, 0)
        per_type[kind] = k + 1
        name = f"{k:03d}"
        p = pool[i][1]
        img = as_mode(read_image(p), colour)
        fg, whole = foreground(img)
        n_whole += whole
        res, mask, donor, info = add_defect(rng, kind, img, fg, donors, colour, str(p))
        frac = int(np.count_nonzero(mask)) / mask.size
        contrast = float(np.abs(res.astype(np.int16) - img)[mask > 0].mean())  # mean change in the mask, levels
        if not 0 < frac < MAX_FRACTION:
            raise RuntimeError(f"{p}: {kind} covers {frac:.4%} of the image (must be > 0 and < 1 %)")
        ys, xs = np.nonzero(mask)
        for sub, arr, fname in (("test", res, f"{name}.png"), ("ground_truth", mask, f"{name}_mask.png")):
            (out / sub / kind).mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out / sub / kind / fname), arr):
                raise SystemExit(f"{out / sub / kind / fname}: cannot write")
        counts[f"test/{kind}"] = counts.get(f"test/{kind}", 0) + 1
        rows.append([f"test/{kind}/{name}.png", kind, f"{frac:.10g}",
                     int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
        srcs.append([f"test/{kind}/{name}.png", str(p.resolve()), str(Path(donor).resolve()) if donor else "",
                     f"{info['on_foreground']:.4f}", f"{contrast:.2f}"])
    for fname, header, data in (("defects.csv", ["file", "type", "covered_fraction", "x0", "y0", "x1", "y1"], rows),
                                ("sources.csv", ["file", "source", "donor", "on_product", "contrast"], srcs)):
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(sorted(data))
        (out / fname).write_text(buf.getvalue())
    fracs = {t: [float(r[2]) for r in rows if r[1] == t] for t in TYPES}
    cover = {t: {"median": float(f"{statistics.median(v):.6g}"), "max": float(f"{max(v):.6g}")}
             for t, v in fracs.items() if v}
    prov_path, prov = provenance(src, pool)
    text = [
        "SYNTHETIC DEFECTS - NOT REAL DEFECT DATA",
        "",
        "Every image under test/scratch, test/spot and test/patch is a GOOD image of the source with one",
        "artificial defect pasted in by bench/small_defects_layout.py (defectflow). Use it as a development set for",
        "small defects only; it says nothing about how a model does on real defects.",
        "",
        f"source folder: {src}",
        f"seed: {seed} (numpy default_rng); --n-test-good {n_test_good} --n-defect {n_defect}",
        f"good pool: train/good {per['train/good']} + test/good {per['test/good']} = {len(pool)} images of the source "
        "(its test/<defect> folders are not used)",
        "counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        "How it was made:",
        "- the pool was shuffled once; train/good and test/good are symlinks to the originals, named <origin>_<name>;",
        "  the defect images come from the remaining held-out goods (none of them is in train/good or test/good).",
        "- product region per image: pixels that differ by more than max(8, 5 sigma) grey levels from a quadratic",
        "  background fitted to the border strip; a frame-filling texture (non-flat border) counts everywhere.",
        f"  Defect positions are drawn from it (>= 98 % of the mask on it); {n_whole} of {len(defect)} defect images",
        "  used the whole image.",
        "- sizes are fractions of the short image side s:",
        "  scratch: anti-aliased slightly curved polyline (heading turns by up to +-0.6 rad), 4-10 % of s long,",
        "           1-3 px wide at 1024 px (at least 1 px), 25-60 grey levels brighter or darker;",
        "  spot:    irregular blob (disc + blurred noise, thresholded, Gaussian-softened edge), radius 0.4-1.2 % of s,",
        "           30-80 levels darker or lighter (colour images: a per-channel tint of up to +-40 %);",
        "  patch:   square or rotated rectangle, 2-4 % of s, cut from a different train/good image at another",
        "           position (CutPaste-style), pasted with a 1-2 px feathered edge.",
        "  A shift is flipped to the other sign where the region has no room (near 0 or 255).",
        f"- masks: ground_truth/<type>/NNN_mask.png, 255 where the defect's blend weight is > {MASK_ALPHA}, else 0.",
        "- defects.csv: file,type,covered_fraction (mask pixels / image pixels),x0,y0,x1,y1 (mask box, inclusive);",
        "  sources.csv: file,source (the good image it was made from),donor (patch source image),",
        "  on_product (share of the mask on the estimated product region),contrast (mean |change| in the mask, levels).",
        "- covered fraction per type (median / max): " + "; ".join(
            f"{t} {c['median']:.3g} / {c['max']:.3g}" for t, c in cover.items()),
        "",
        "Licence: these images are derived from the source images and carry the source's licence and terms.",
        f"Source provenance ({prov_path if prov_path else 'no PROVENANCE.txt found'}), first lines:",
        *[f"  {line}" for line in prov],
    ]
    (out / "SYNTHETIC.txt").write_text("\n".join(text) + "\n")
    contrast = {t: round(statistics.median(float(r[4]) for r in srcs if f"/{t}/" in r[0]), 1) for t in cover}
    return {"out": str(out), "seed": seed, **dict(sorted(counts.items())), "fg_whole_image": n_whole,
            "covered_fraction": cover, "contrast_median": contrast,
            "min_on_product": round(min(float(r[3]) for r in srcs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="an MVTec-layout category folder (uses train/good + test/good)")
    ap.add_argument("--out", required=True, help="output folder outside the repo (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test-good", type=int, default=40)
    ap.add_argument("--n-defect", type=int, default=60)
    args = ap.parse_args()
    cv2.setNumThreads(1)  # light on a shared machine; the outputs do not depend on it
    if args.n_test_good < 0 or args.n_defect < 1:
        raise SystemExit("--n-test-good must be >= 0 and --n-defect >= 1")
    print(json.dumps(build(Path(args.src), Path(args.out), args.seed, args.n_test_good, args.n_defect)))


if __name__ == "__main__":
    sys.exit(main())
