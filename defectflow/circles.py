"""Finding the round outline of a part (seed 003, section 3.3), as pure functions.

Grey image -> morphological open/close and a light blur -> one-pixel Laplacian
zero-crossing edges where the gradient stands out of the noise -> contours ->
a circle per contour (cv2.fitEllipse for closed round contours, else the arc the
contour's points agree on) -> geometric filters (roundness, fit error, radius >=
min_radius * side, centre inside, edges along most of the circumference) ->
outlier removal by distance to the mean centre -> the largest circle, polished
onto the gradient peaks along rays from its centre.
"""
from __future__ import annotations

import cv2
import numpy as np

from defectflow.imgops import odd

Circle = tuple[float, float, float]

MIN_ROUNDNESS = 0.90     # shorter / longer ellipse axis
MAX_FIT_PX = 0.6         # median |distance to centre - r| of a contour's points, px ...
MAX_FIT_REL = 0.003      # ... plus this fraction of r
INLIER_BAND = 0.02       # contour points this close to a circle (fraction of r, >= 1.5 px) are on it
MIN_COVERAGE = 0.35      # an arc must run along at least this share of its circle
MIN_SUPPORT = 0.5        # a candidate circle must lie on edges along this share of its circumference
EDGE_SNR = 4.0           # edge threshold, in units of the median gradient (the noise, mostly)
EDGE_MIN = 4.0           # ... and never below this (flat images)
SNAP_RAYS = 180          # rays used to put the chosen circle onto the outline
MIN_ARC = 0.25           # contour points needed, as a share of the smallest circle's perimeter
CENTRE_TOL = 0.05        # outlier distance from the mean centre, fraction of the image side


def to_grey(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def blur_sigma(side: int) -> float:
    return max(1.5, side / 150)


def smooth_grey(grey: np.ndarray) -> np.ndarray:
    """Morphological open + close (drops specks and thin lines), then a light blur (float32)."""
    side = min(grey.shape)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (odd(side / 50),) * 2)
    smooth = cv2.morphologyEx(cv2.morphologyEx(grey, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
    return cv2.GaussianBlur(smooth.astype(np.float32), (0, 0), blur_sigma(side))


def gradient(smooth: np.ndarray) -> np.ndarray:
    """Gradient magnitude (Sobel) of a float image."""
    return cv2.magnitude(cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3))


def edge_map(smooth: np.ndarray) -> np.ndarray:
    """0/255 one-pixel edges: zero crossings of the Laplacian (seed 003, eq. 1) where the gradient is strong.

    "Strong" is relative to the noise (the median gradient), so one bright edge
    elsewhere does not hide a weaker outline; thin edges keep a ring's two
    outlines and a line across it from merging into one blob.
    """
    lap = cv2.Laplacian(smooth, cv2.CV_32F, ksize=3)
    pos = lap > 0
    mag = np.abs(lap)
    cross = np.zeros(pos.shape, bool)
    flip = pos[:, :-1] != pos[:, 1:]            # sign change to the right: mark the pixel nearer zero
    cross[:, :-1] |= flip & (mag[:, :-1] <= mag[:, 1:])
    cross[:, 1:] |= flip & (mag[:, 1:] < mag[:, :-1])
    flip = pos[:-1, :] != pos[1:, :]            # ... and below
    cross[:-1, :] |= flip & (mag[:-1, :] <= mag[1:, :])
    cross[1:, :] |= flip & (mag[1:, :] < mag[:-1, :])
    grad = gradient(smooth)
    strong = grad > max(EDGE_MIN, EDGE_SNR * float(np.median(grad)))
    return (cross & strong).astype(np.uint8) * 255


def circle_3pts(p: np.ndarray, q: np.ndarray, s: np.ndarray) -> Circle | None:
    """The circle through three points, or None if they are (nearly) on a line."""
    (ax, ay), (bx, by), (cx, cy) = p, q, s
    d = 2.0 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    if abs(d) < 1e-6:
        return None
    a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx * cx + cy * cy
    ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d
    uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d
    return float(ux), float(uy), float(np.hypot(ax - ux, ay - uy))


def circle_lsq(x: np.ndarray, y: np.ndarray) -> Circle | None:
    """Least-squares circle through points (algebraic fit), or None if degenerate."""
    a = np.column_stack([x, y, np.ones_like(x)])
    sol, *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
    cx, cy = -sol[0] / 2.0, -sol[1] / 2.0
    r2 = cx * cx + cy * cy - sol[2]
    return (float(cx), float(cy), float(np.sqrt(r2))) if r2 > 0 else None


def _near(pts: np.ndarray, c: Circle) -> np.ndarray:
    return np.abs(np.hypot(pts[:, 0] - c[0], pts[:, 1] - c[1]) - c[2]) <= max(1.5, INLIER_BAND * c[2])


def _spacings(n: int, r_min: float) -> list[int]:
    """Point spacings for the three-point circles: n/3, halved down to about r_min / 2."""
    out, s = [], n // 3
    while s >= 2 and (not out or s >= r_min / 2):
        out.append(s)
        s //= 2
    return out


def arc_points(points: np.ndarray, r_min: float, r_max: float) -> np.ndarray | None:
    """The contour points that lie on one circle (radius in [r_min, r_max]), or None.

    Deterministic consensus: circles through three points spread along the contour,
    at spacings from a third of the contour down to about half the smallest radius,
    from starting points a quarter spacing apart (so every arc long enough to count
    is sampled); the circle most points agree with wins, and must be covered along
    at least MIN_COVERAGE of its circumference. This keeps the arc when the contour
    also runs along a line or an occluder.
    """
    pts = points.reshape(-1, 2).astype(np.float64)
    n = len(pts)
    best, best_circle = None, None
    for spacing in _spacings(n, r_min):
        for i in range(0, n, max(1, spacing // 4)):
            c = circle_3pts(pts[i], pts[(i + spacing) % n], pts[(i + 2 * spacing) % n])
            if c is None or not r_min <= c[2] <= r_max:       # (nearly) straight runs give huge circles
                continue
            near = _near(pts, c)
            if best is None or near.sum() > best.sum():
                best, best_circle = near, c
    if best is None:
        return None
    refit = circle_lsq(pts[best, 0], pts[best, 1])      # polish once, then take its points
    if refit is not None and r_min <= refit[2] <= r_max:
        best, best_circle = _near(pts, refit), refit
    if best.sum() < MIN_COVERAGE * 2 * np.pi * best_circle[2]:
        return None
    return pts[best]


def fits_well(err_px: float, r: float) -> bool:
    """Thin edges of a true circle stay within about half a pixel of it."""
    return err_px <= MAX_FIT_PX + MAX_FIT_REL * r


def _ellipse_circle(pts: np.ndarray) -> tuple[Circle, float, float] | None:
    """cv2.fitEllipse of points as ((cx, cy, r), roundness, median distance to the ellipse in px).

    The error is measured against the fitted ellipse, not the circle: a real round rim seen a
    little off-axis is a slightly flattened ellipse (roundness ~0.98) whose radial deviation
    from a circle grows with r; how round it must be is ``MIN_ROUNDNESS``'s job.
    """
    (cx, cy), (a, b), angle = cv2.fitEllipse(pts.astype(np.float32))
    if min(a, b) <= 0:
        return None
    r = (a + b) / 4.0
    t = np.deg2rad(angle)
    dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
    u = (dx * np.cos(t) + dy * np.sin(t)) / (a / 2.0)
    v = (-dx * np.sin(t) + dy * np.cos(t)) / (b / 2.0)
    err = float(np.median(np.abs(np.hypot(u, v) - 1.0))) * r
    return (float(cx), float(cy), float(r)), float(min(a, b) / max(a, b)), err


def fit_circle(points: np.ndarray, r_min: float, r_max: float) -> tuple[Circle, float, float] | None:
    """Circle of a contour: ((cx, cy, r), roundness, median fit error in px), or None.

    A closed round contour is fitted with cv2.fitEllipse (seed 003). A contour that
    also runs along something else (a line across the part, an occluder) falls back
    to the arc its points agree on, fitted by least squares (an ellipse fit of a
    partial arc is ill-conditioned); its roundness is then judged by the fit error.
    """
    pts = points.reshape(-1, 2).astype(np.float64)
    whole = _ellipse_circle(pts)
    if whole is not None and whole[1] >= MIN_ROUNDNESS and fits_well(whole[2], whole[0][2]):
        return whole
    arc = arc_points(pts, r_min, r_max)
    circle = circle_lsq(arc[:, 0], arc[:, 1]) if arc is not None and len(arc) >= 5 else None
    if circle is None:
        return None
    err = float(np.median(np.abs(np.hypot(arc[:, 0] - circle[0], arc[:, 1] - circle[1]) - circle[2])))
    return circle, 1.0, err


def circle_candidates(edges: np.ndarray, min_radius: float) -> list[Circle]:
    """Near-circular fits on the edge contours, big enough and centred inside the image."""
    h, w = edges.shape
    side = min(h, w)
    r_min = min_radius * side
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    found = []
    for c in contours:
        if len(c) < max(20, MIN_ARC * 2 * np.pi * r_min):
            continue
        fit = fit_circle(c, r_min, side)
        if fit is None:
            continue
        (cx, cy, r), roundness, err = fit
        if (roundness >= MIN_ROUNDNESS and fits_well(err, r) and r_min <= r <= side
                and 0 <= cx < w and 0 <= cy < h):
            found.append((cx, cy, r))
    return found


def edge_support(edge_dist: np.ndarray, circle: Circle) -> float:
    """Share of the circle's circumference that runs along edges.

    ``edge_dist``: distance of each pixel to the nearest edge (cv2.distanceTransform). A point
    counts when an edge is within max(2 px, INLIER_BAND * r): a real rim seen a little off-axis
    strays from its circle by about a percent of r.
    """
    cx, cy, r = circle
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    x = np.round(cx + r * np.cos(theta)).astype(int)
    y = np.round(cy + r * np.sin(theta)).astype(int)
    inside = (x >= 0) & (x < edge_dist.shape[1]) & (y >= 0) & (y < edge_dist.shape[0])
    tol = max(2.0, INLIER_BAND * r)
    return float((edge_dist[y[inside], x[inside]] <= tol).sum() / len(theta))


def drop_outliers(circles: list[Circle], tol: float) -> list[Circle]:
    """Remove, one at a time, the circle farthest from the mean centre while it is over ``tol`` away."""
    kept = list(circles)
    while len(kept) >= 3:
        centres = np.array([(c[0], c[1]) for c in kept])
        d = np.linalg.norm(centres - centres.mean(axis=0), axis=1)
        worst = int(d.argmax())
        if d[worst] <= tol:
            break
        kept.pop(worst)
    return kept


def snap_to_edge(smooth: np.ndarray, circle: Circle, reach: float) -> Circle | None:
    """Refit ``circle`` on the strongest gradient along rays from its centre, within +-reach of r.

    Sub-pixel polish of a contour fit: the gradient peak along each ray is the
    outline; rays that meet something else (a line, an occluder) are dropped.
    """
    cx, cy, r = circle
    grad = gradient(smooth)
    theta = np.linspace(0, 2 * np.pi, SNAP_RAYS, endpoint=False)[:, None]
    radii = (r + np.arange(-reach, reach + 0.25, 0.5))[None, :]
    mx = (cx + radii * np.cos(theta)).astype(np.float32)
    my = (cy + radii * np.sin(theta)).astype(np.float32)
    prof = cv2.remap(grad, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1)
    best = prof.argmax(axis=1)
    rows = np.arange(SNAP_RAYS)
    peak = prof[rows, best]
    ok = peak > max(1e-3, 0.25 * float(np.median(peak)))     # rays that cross no edge are dropped
    x, y = mx[rows, best][ok].astype(np.float64), my[rows, best][ok].astype(np.float64)
    if len(x) < SNAP_RAYS // 3:
        return None
    fit: Circle | None = circle
    for _ in range(3):      # drop rays that hit something else (judged against the last fit), refit
        resid = np.abs(np.hypot(x - fit[0], y - fit[1]) - fit[2])
        keep = resid <= max(1.0, 2.5 * float(np.median(resid)))
        if keep.sum() < SNAP_RAYS // 3:
            return None
        x, y = x[keep], y[keep]
        fit = circle_lsq(x, y)
        if fit is None:
            return None
    return fit


def find_circle(img: np.ndarray, min_radius: float = 0.15) -> Circle | None:
    """Largest round outline in ``img`` as (cx, cy, r) in pixels, or None if there is none."""
    grey = to_grey(img)
    side = min(grey.shape)
    smooth = smooth_grey(grey)
    edges = edge_map(smooth)
    edge_dist = cv2.distanceTransform(255 - edges, cv2.DIST_L2, 3)
    circles = [c for c in circle_candidates(edges, min_radius) if edge_support(edge_dist, c) >= MIN_SUPPORT]
    circles = drop_outliers(circles, CENTRE_TOL * side)
    if not circles:
        return None
    best = max(circles, key=lambda c: c[2])
    reach = 2 * blur_sigma(side) + 3
    snapped = snap_to_edge(smooth, best, reach)
    if snapped is None or np.hypot(snapped[0] - best[0], snapped[1] - best[1]) > reach or \
            abs(snapped[2] - best[2]) > reach:
        return best
    return snapped
