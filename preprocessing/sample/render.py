"""The synthetic radiograph renderer: anatomy from analytic shapes plus noise, opacities for PNEUMONIA, the
findings of the multi-label sample (`FINDINGS`), and the JPEG encoding with its SYNTHETIC marks (pure functions
of a numpy Generator)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

JPEG_COMMENT = b"SYNTHETIC cxrscale sample - not a real radiograph"
JPEG_QUALITY = 92


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
# Anatomy is described in "anatomy units": 1 unit = min(height, width) of the
# output image, origin at the image centre, +x = viewer's right (= patient's
# left, as on a PA film), +y = down. Intensities are float "density": 0 = air
# (black), ~0.6 = soft tissue, added bone/opacity up to ~1.


@dataclass(frozen=True)
class _Lung:
    """One lung field, anatomy units.

    cx, cy: centre; a, b: half-width and half-height; dome: height of the
    diaphragm dome that cuts the base; base: where the dome's ends sit, as a
    fraction of b below the centre.
    """

    cx: float
    cy: float
    a: float
    b: float
    dome: float
    base: float


@dataclass(frozen=True)
class _Anatomy:
    """Per-image anatomical parameters, anatomy units."""

    right_lung: _Lung  # patient's right = viewer's left
    left_lung: _Lung
    heart_c: tuple[float, float]
    heart_ax: tuple[float, float]
    heart_angle: float  # degrees
    shoulder_y: float
    shoulder_hw: float
    neck_hw: float
    mediastinum_hw: float
    arms: bool
    rib_spacing: float
    rib_top: float


@dataclass(frozen=True)
class _Canvas:
    """Drawing surface: shape (H, W) pixels, anatomy origin at ``centre`` (x, y)
    pixels, ``unit`` pixels per anatomy unit."""

    shape: tuple[int, int]
    centre: tuple[float, float]
    unit: float

    @property
    def xs(self) -> np.ndarray:
        """x (anatomy units) of each column, float32 (W,)."""
        return (np.arange(self.shape[1], dtype=np.float32) - self.centre[0]) / self.unit

    @property
    def ys(self) -> np.ndarray:
        """y (anatomy units) of each row, float32 (H,)."""
        return (np.arange(self.shape[0], dtype=np.float32) - self.centre[1]) / self.unit

    def px(self, x: float, y: float) -> tuple[int, int]:
        """Anatomy units -> integer pixel (x, y) for OpenCV drawing."""
        cx, cy = self.centre
        return int(round(cx + x * self.unit)), int(round(cy + y * self.unit))

    def axes(self, ax: float, ay: float) -> tuple[int, int]:
        """Ellipse half-axes, anatomy units -> integer pixels (at least 1)."""
        return max(1, int(ax * self.unit)), max(1, int(ay * self.unit))

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``size`` (int side or (height, width)) to (height, width) pixels."""
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    if h < 16 or w < 16:
        raise ValueError(f"image size must be at least 16x16 pixels, got {h}x{w}")
    return h, w


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw jittered anatomy: a small paediatric chest, slightly asymmetric."""
    u = rng.uniform
    # The right hemidiaphragm usually sits higher (liver), so the right lung is
    # a little shorter; the left lung is narrowed medially by the heart.
    right = _Lung(cx=-0.215 + u(-0.015, 0.015), cy=-0.03 + u(-0.02, 0.02),
                  a=0.175 + u(-0.015, 0.015), b=0.30 + u(-0.02, 0.02),
                  dome=0.07 + u(-0.02, 0.02), base=0.80 + u(-0.05, 0.05))
    left = _Lung(cx=0.215 + u(-0.015, 0.015), cy=-0.015 + u(-0.02, 0.02),
                 a=0.17 + u(-0.015, 0.015), b=0.31 + u(-0.02, 0.02),
                 dome=0.06 + u(-0.02, 0.02), base=0.84 + u(-0.05, 0.05))
    return _Anatomy(
        right_lung=right,
        left_lung=left,
        # Paediatric hearts are relatively large (cardiothoracic ratio ~0.5).
        heart_c=(0.06 + u(-0.02, 0.02), 0.15 + u(-0.02, 0.02)),
        heart_ax=(0.185 + u(-0.02, 0.02), 0.13 + u(-0.015, 0.015)),
        heart_angle=-20.0 + u(-8, 8),
        shoulder_y=-0.38 + u(-0.03, 0.03),
        shoulder_hw=0.47 + u(-0.03, 0.03),
        neck_hw=0.12 + u(-0.015, 0.015),
        mediastinum_hw=0.055 + u(-0.01, 0.015),
        arms=bool(rng.random() < 0.5),
        rib_spacing=0.068 + u(-0.006, 0.006),
        rib_top=-0.36 + u(-0.02, 0.02),
    )


def _soft(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed copy of a float32 image (same shape), sigma in pixels.

    Wide blurs run on a downsampled copy: the result is smooth anyway and
    this keeps rendering fast (kernel cost grows with sigma).
    """
    sigma_px = max(sigma_px, 0.5)
    if sigma_px < 4.0:
        return cv2.GaussianBlur(mask, (0, 0), sigma_px)
    h, w = mask.shape
    f = int(sigma_px // 2)
    small = cv2.resize(mask, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(-z, -30.0, 30.0)))


def _lung_mask(cv: _Canvas, lung: _Lung) -> np.ndarray:
    """Hard mask (float32 0/1, canvas shape) of one lung field.

    A rounded superellipse narrowed towards the apex, with the base cut by the
    diaphragm dome, giving sharp costophrenic angles and a rounded apex.
    """
    out = cv.zeros()
    xs, ys = cv.xs, cv.ys
    # Only the lung's bounding box can be inside; evaluate there (speed).
    cols = np.flatnonzero(np.abs(xs - lung.cx) < lung.a)
    rows = np.flatnonzero(np.abs(ys - lung.cy) < lung.b)
    if cols.size == 0 or rows.size == 0:
        return out
    X = xs[cols[0]:cols[-1] + 1][None, :]
    Y = ys[rows[0]:rows[-1] + 1][:, None]
    yn = (Y - lung.cy) / lung.b
    taper = 0.5 + 0.5 * np.sqrt(np.clip((yn + 1.0) / 2.0, 0.0, 1.0))  # narrow apex
    xn = (X - lung.cx) / (lung.a * taper + 1e-6)
    inside = np.abs(xn) ** 2.4 + np.abs(yn) ** 2.4 < 1.0
    xd = np.clip((X - lung.cx) / lung.a, -1.0, 1.0)
    diaphragm = lung.cy + lung.b * lung.base - lung.dome * (1.0 - xd**2)
    out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = inside & (Y < diaphragm)
    return out


def _body_thickness(cv: _Canvas, an: _Anatomy) -> np.ndarray:
    """Soft-tissue path length through the body, float32 (canvas shape) in [0, 1].

    An elliptical cross-section gives path length ~ sqrt(1 - (x / half_width)^2),
    which produces the rounded, brighter-towards-the-middle body outline.
    """
    X, Y = cv.xs[None, :], cv.ys[:, None]
    # Neck widens smoothly into the shoulders; the trunk tapers slightly below.
    hw = an.neck_hw + (an.shoulder_hw - an.neck_hw) * _sigmoid((Y - an.shoulder_y) / 0.05)
    hw = hw - 0.05 * np.clip(Y - 0.15, 0.0, None)
    t = np.sqrt(np.clip(1.0 - (X / hw) ** 2, 0.0, 1.0))
    if an.arms:
        # Arms hanging beside the trunk, separated from it by a gap of air.
        for side in (-1.0, 1.0):
            ax = side * (an.shoulder_hw + 0.075)
            arm = np.sqrt(np.clip(1.0 - ((X - ax) / 0.06) ** 2, 0.0, 1.0))
            t = np.maximum(t, 0.85 * arm * _sigmoid((Y - an.shoulder_y - 0.03) / 0.03))
    # Flatten the profile's top (a trunk is not a cylinder); cheaper than a pow.
    return (1.0 - (1.0 - t) ** 2).astype(np.float32)


def _cardiac_silhouette(cv: _Canvas, an: _Anatomy) -> np.ndarray:
    """Hard mask (float32 0/1) of heart, right atrial border and aortic knob."""
    heart = cv.zeros()
    hx, hy = an.heart_c
    cv2.ellipse(heart, cv.px(hx, hy), cv.axes(*an.heart_ax), an.heart_angle, 0, 360, 1.0, -1)
    # Right atrium bulges just right of the spine (viewer's left); the aortic
    # knob sits above the heart on the left: the classic cardiac outline.
    cv2.ellipse(heart, cv.px(hx - 0.115, hy - 0.01), cv.axes(0.07, 0.10), 0, 0, 360, 1.0, -1)
    cv2.ellipse(heart, cv.px(0.06, an.right_lung.cy - 0.13), cv.axes(0.045, 0.04),
                0, 0, 360, 1.0, -1)
    return heart


def _draw_ribs(cv: _Canvas, an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Rib layer (float32, canvas shape), ~1 on rib bands.

    Posterior ribs are arcs starting near the spine, rising slightly, then
    sweeping laterally and down; anterior ribs are fainter bands sloping
    medially downwards.
    """
    layer = cv.zeros()
    thick = max(2, int(round(0.021 * cv.unit)))
    for side in (-1, 1):
        for i in range(9):
            y = an.rib_top + i * an.rib_spacing * (1.0 + 0.03 * i)
            ax = 0.29 + 0.01 * i + rng.uniform(-0.01, 0.01)
            ay = 0.15 + 0.006 * i
            # Arcs open downwards (the top of an OpenCV ellipse is angle 270,
            # y down); the tilt makes the lateral part descend.
            start, end = (262, 372) if side > 0 else (168, 278)
            pts = cv2.ellipse2Poly(cv.px(side * (0.07 + 0.008 * i), y + ay), cv.axes(ax, ay),
                                   int(side * 14), start, end, 4)
            cv2.polylines(layer, [pts], False, 1.0, thick, cv2.LINE_8)
        for i in range(6):
            y0 = an.rib_top + 0.10 + i * an.rib_spacing * 1.1
            pts = np.array([cv.px(side * 0.40, y0), cv.px(side * 0.25, y0 + 0.06),
                            cv.px(side * 0.12, y0 + 0.14)], np.int32)
            cv2.polylines(layer, [pts], False, 0.35, max(2, thick - 1), cv2.LINE_8)
    return layer


def _draw_clavicles(cv: _Canvas, an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Clavicle layer (float32, canvas shape): S-shaped bars rising laterally."""
    layer = cv.zeros()
    thick = max(2, int(round(0.032 * cv.unit)))
    xs = (0.05, 0.12, 0.21, 0.30, 0.38, 0.43)
    dys = (0.03, 0.01, -0.005, -0.02, -0.045, -0.05)
    for side in (-1, 1):
        y0 = an.shoulder_y + 0.065 + rng.uniform(-0.01, 0.01)
        pts = np.array([cv.px(side * x, y0 + dy) for x, dy in zip(xs, dys)], np.int32)
        cv2.polylines(layer, [pts], False, 1.0, thick, cv2.LINE_8)
    return layer


def _draw_spine(cv: _Canvas) -> np.ndarray:
    """Spine layer (float32, canvas shape): vertebral bodies with disc gaps."""
    layer = cv.zeros()
    y, k = -0.62, 0
    while y < 0.75:
        hgt = 0.052 + 0.0004 * k  # vertebral bodies grow slightly going down
        cv2.rectangle(layer, cv.px(-0.042, y), cv.px(0.042, y + hgt), 1.0, -1)
        y += hgt + 0.014
        k += 1
    return layer


def _draw_hila_and_vessels(cv: _Canvas, an: _Anatomy,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(hila, vessels) layers (float32, canvas shape).

    Hilar shadows plus branching, tapering bronchovascular markings fanning out
    from each hilum: normal bright structure inside the lungs of both classes.
    """
    hila, vessels = cv.zeros(), cv.zeros()
    for lung, side in ((an.right_lung, -1.0), (an.left_lung, 1.0)):
        cv2.ellipse(hila, cv.px(lung.cx - side * 0.1, lung.cy), cv.axes(0.045, 0.075),
                    0, 0, 360, 1.0, -1)
        for _ in range(11):
            ang = rng.uniform(-1.2, 1.3)  # radians from horizontal, down positive
            x, y, v = lung.cx - side * 0.09, lung.cy - 0.01, 1.0
            for _step in range(6):
                ang += rng.normal(0.0, 0.25)
                nx, ny = x + side * math.cos(ang) * 0.035, y + math.sin(ang) * 0.035
                t = max(1, int(round(0.012 * cv.unit * v)))
                cv2.line(vessels, cv.px(x, y), cv.px(nx, ny), v, t)
                x, y, v = nx, ny, v * 0.78
    return hila, vessels


def _patch_centre(cv: _Canvas, depth: np.ndarray, rng: np.random.Generator, lung: _Lung,
                  lower_bias: float, min_depth_px: float) -> tuple[float, float] | None:
    """A point (anatomy units) in ``lung`` at least ``min_depth_px`` inside the field.

    depth: distance (pixels, canvas shape) to the nearest non-lung pixel.
    Keeping centres off the borders puts most of a patch inside the lung
    instead of behind the heart or mediastinum. lower_bias > 0 favours the
    middle and lower zones (lobar pneumonia). None if nothing was found.
    """
    for attempt in range(40):
        need = min_depth_px if attempt < 20 else 0.5 * min_depth_px
        yn = 2.0 * rng.beta(1.0 + lower_bias, 1.0) - 1.0
        x = lung.cx + rng.uniform(-0.7, 0.7) * lung.a
        y = lung.cy + 0.8 * yn * lung.b
        px, py = cv.px(x, y)
        if 0 <= py < depth.shape[0] and 0 <= px < depth.shape[1] and depth[py, px] >= need:
            return x, y
    return None


def _opacity_plan(rng: np.random.Generator,
                  pattern: str) -> list[tuple[int, float, float, float, bool]]:
    """Patches as (lung 0=right/1=left, radius [units], core density,
    lower-zone bias, may have a fissure edge)."""
    if pattern == "bacteria":
        # Lobar-like: one large dense patch, sometimes satellites.
        main = int(rng.integers(0, 2))
        plan = [(main, rng.uniform(0.13, 0.19), rng.uniform(0.22, 0.34), 1.5, True)]
        if rng.random() < 0.4:
            plan.append((main, rng.uniform(0.06, 0.10), rng.uniform(0.12, 0.22), 1.0, False))
        if rng.random() < 0.3:
            plan.append((1 - main, rng.uniform(0.06, 0.10), rng.uniform(0.10, 0.20), 1.0, False))
        return plan
    # Viral-like: several smaller, fainter patches spread over both lungs.
    return [(int(rng.integers(0, 2)), rng.uniform(0.07, 0.11), rng.uniform(0.14, 0.22), 0.3, False)
            for _ in range(int(rng.integers(4, 8)))]


def _draw_opacities(cv: _Canvas, an: _Anatomy, lungs_hard: np.ndarray,
                    rng: np.random.Generator, pattern: str) -> np.ndarray:
    """Pneumonic opacity layer (float32, canvas shape, density ~0..0.35).

    Each patch is a cluster of overlapping ellipses blurred at a scale tied to
    the patch size, peak-normalised, sometimes cut by a fissure, and modulated
    by a mottled low-frequency texture, so it reads as ill-defined
    consolidation rather than a dot.
    """
    layer = cv.zeros()
    lungs = (an.right_lung, an.left_lung)
    depth = cv2.distanceTransform((lungs_hard > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    X, Y = cv.xs[None, :], cv.ys[:, None]
    for which, radius, density, bias, fissure in _opacity_plan(rng, pattern):
        got = _patch_centre(cv, depth, rng, lungs[which], bias, 0.5 * radius * cv.unit)
        if got is None:
            continue
        x0, y0 = got
        patch = cv.zeros()
        for _ in range(int(rng.integers(5, 10))):
            dx, dy = rng.normal(0.0, 0.5 * radius, 2)
            r1 = radius * rng.uniform(0.45, 0.9)
            r2 = r1 * rng.uniform(0.55, 1.0)
            cv2.ellipse(patch, cv.px(x0 + dx, y0 + dy), cv.axes(r1, r2),
                        float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        patch = _soft(patch, 0.4 * radius * cv.unit)
        patch /= max(float(patch.max()), 1e-6)  # so ``density`` is the core value
        if fissure and rng.random() < 0.5:
            # Lobar consolidation often has one sharp border along a fissure:
            # cut the patch with a nearly horizontal edge above its core.
            cut_y = y0 - rng.uniform(0.2, 0.6) * radius
            tilt = rng.uniform(-0.25, 0.25)
            patch *= _sigmoid((Y - cut_y - tilt * (X - x0)) * cv.unit / 1.5)
        # Overlapping patches must not add up to white spots: take the maximum.
        np.maximum(layer, density * patch, out=layer)
    # Mottling: consolidation is patchy, with partly aerated bits inside.
    tex = cv2.resize(rng.standard_normal((8, 8)).astype(np.float32),
                     (cv.shape[1], cv.shape[0]), interpolation=cv2.INTER_CUBIC)
    layer *= np.clip(0.85 + 0.25 * tex, 0.45, 1.1)
    return layer


def _compose_chest(cv: _Canvas, an: _Anatomy, rng: np.random.Generator,
                   no_markings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(density image, hard lung mask), both float32 canvas shape, of a clear chest; no vessel markings where
    `no_markings` is 1 (the air of a pneumothorax)."""
    Y = cv.ys[:, None]
    edge = 0.012 * cv.unit  # pixels; softness of organ borders
    body = _body_thickness(cv, an)
    heart = _cardiac_silhouette(cv, an)
    # Heart and mediastinum overlap the medial lungs: no aerated lung there.
    mediastinum = (np.abs(cv.xs) < an.mediastinum_hw).astype(np.float32)[None, :]
    lungs_hard = np.maximum(_lung_mask(cv, an.right_lung), _lung_mask(cv, an.left_lung))
    lungs_hard *= (1.0 - heart) * (1.0 - mediastinum)
    lungs = _soft(lungs_hard, edge)

    img = 0.04 + 0.55 * body
    # Aerated lung is darkest in the upper zones; the bases overlap more soft
    # tissue, so darken less towards the diaphragm.
    zone = np.clip(1.05 - 0.35 * (Y - an.right_lung.cy + 0.3), 0.75, 1.1)
    img -= 0.34 * lungs * zone
    img += 0.05 * _soft(heart, 1.5 * edge) + 0.04 * _soft(heart, 6 * edge)  # denser centrally
    # Trachea: an air column in the upper mediastinum down to the carina.
    trachea = ((np.abs(cv.xs[None, :] - 0.005) < 0.02) & (Y < an.right_lung.cy - 0.12))
    img -= 0.10 * _soft(trachea.astype(np.float32), edge) * body
    # Gastric air bubble under the left hemidiaphragm (viewer's right).
    bubble, lb = cv.zeros(), an.left_lung
    cv2.ellipse(bubble, cv.px(lb.cx + 0.02, lb.cy + lb.b * lb.base + 0.07),
                cv.axes(0.07, 0.045), 0, 0, 360, 1.0, -1)
    img -= 0.10 * _soft(bubble, 2 * edge)
    # Bones: seen through aerated lung, barely through the soft tissue.
    inside = (body > 0.05).astype(np.float32)
    ribs = _soft(_draw_ribs(cv, an, rng), 0.006 * cv.unit)
    img += 0.075 * ribs * (0.15 + 0.85 * lungs) * inside
    img += 0.13 * _soft(_draw_clavicles(cv, an, rng), 0.008 * cv.unit) * inside
    # Spine: clear in the upper mediastinum, faint behind heart and abdomen.
    spine_vis = np.clip(1.0 - 1.8 * (Y - an.right_lung.cy + 0.1), 0.3, 1.0)
    img += 0.08 * _soft(_draw_spine(cv), 0.006 * cv.unit) * body * spine_vis
    hila, vessels = _draw_hila_and_vessels(cv, an, rng)
    vessels = _soft(vessels, 0.004 * cv.unit)
    if no_markings is not None:
        vessels *= 1.0 - no_markings
    img += (0.06 * _soft(hila, 3 * edge) + 0.07 * vessels) * lungs
    return img, lungs_hard


def _random_pose(img: np.ndarray, rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Slight random rotation / scale / shift of a float32 canvas, cropped to hw=(h, w)."""
    h, w = hw
    H, W = img.shape
    angle = rng.uniform(-4.0, 4.0)  # degrees
    scale = rng.uniform(0.93, 1.06)
    tx, ty = rng.uniform(-0.03, 0.03, 2) * min(h, w)
    m = cv2.getRotationMatrix2D((W / 2.0, H / 2.0), angle, scale)
    m[0, 2] += w / 2.0 - W / 2.0 + tx
    m[1, 2] += h / 2.0 - H / 2.0 + ty
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _film(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure and film effects on a float32 (H, W) density image -> uint8 (H, W).

    Low-frequency non-uniformity, slight unsharpness, grain, then a random
    global brightness, contrast and gamma so that mean intensity alone cannot
    tell the classes apart.
    """
    h, w = img.shape
    low = cv2.resize(rng.standard_normal((4, 4)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    img = cv2.GaussianBlur(img + 0.03 * low, (0, 0), 0.5 + 0.002 * min(h, w))
    grain = rng.standard_normal((h, w), dtype=np.float32)
    img = img + 0.012 * grain + 0.024 * cv2.GaussianBlur(grain, (0, 0), 1.2)
    contrast = rng.uniform(0.75, 1.3)
    brightness = rng.uniform(-0.12, 0.12)
    gamma = math.exp(rng.uniform(math.log(0.75), math.log(1.3)))
    img = np.clip((img - 0.35) * contrast + 0.35 + brightness, 0.0, 1.0) ** gamma
    return np.round(img * 255.0).astype(np.uint8)


def render_radiograph(rng: np.random.Generator, size: int | tuple[int, int],
                      pneumonia: bool, *, pattern: str | None = None) -> np.ndarray:
    """Render one synthetic frontal paediatric chest radiograph.

    Args:
        rng: random generator; the image is a pure function of its state.
        size: output side in pixels, or (height, width).
        pneumonia: add patchy consolidation-like opacities in the lung fields.
        pattern: "bacteria" (one large dense lobar-like patch, maybe
            satellites) or "virus" (several smaller, fainter patches in both
            lungs); None picks one at random. Ignored if not ``pneumonia``.

    Returns:
        uint8 array of shape (height, width), greyscale, bright = dense.
    """
    if pattern not in (None, "bacteria", "virus"):
        raise ValueError(f"pattern must be 'bacteria', 'virus' or None, got {pattern!r}")
    h, w = _as_hw(size)
    an = _sample_anatomy(rng)
    if pneumonia and pattern is None:
        pattern = "bacteria" if rng.random() < 0.65 else "virus"
    # Draw on a larger canvas so the final rotation/scale never exposes edges.
    H, W = int(round(h * 1.3)), int(round(w * 1.3))
    cv = _Canvas((H, W), (W / 2.0, H / 2.0), float(min(h, w)))
    img, lungs_hard = _compose_chest(cv, an, rng)
    if pneumonia:
        opac = _draw_opacities(cv, an, lungs_hard, rng, pattern or "bacteria")
        # Opacities stop at the pleura and mediastinum (silhouette sign).
        img += opac * _soft(lungs_hard, 0.024 * cv.unit)
    return _film(_random_pose(img, rng, (h, w)), rng)


# The findings the multi-label sample renders, each drawn as a radiologist would see it.
FINDINGS = ("Cardiomegaly", "Consolidation", "Effusion", "Pneumothorax")


def _enlarged_heart(an: _Anatomy, rng: np.random.Generator) -> _Anatomy:
    """Cardiomegaly: the cardiac silhouette widened (cardiothoracic ratio well above 0.5) and dropped a little,
    its apex pushed towards the left chest wall."""
    k = rng.uniform(1.35, 1.5)
    (hx, hy), (ax, ay) = an.heart_c, an.heart_ax
    return dataclasses.replace(an, heart_c=(hx + 0.03 * k, hy + 0.02), heart_ax=(ax * k, ay * (0.85 + 0.2 * k)))


def _draw_effusion(cv: _Canvas, an: _Anatomy, lungs_hard: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pleural effusion layer (float32 density, canvas shape): fluid filling one lung's base up to a meniscus
    that rises towards the chest wall, which blunts the costophrenic angle. Fluid replaces aerated lung, so it
    adds density only where the lung field was."""
    which = int(rng.integers(0, 2))
    lung = (an.right_lung, an.left_lung)[which]
    lateral = -1.0 if which == 0 else 1.0          # the chest wall side of this lung, in x
    X, Y = cv.xs[None, :], cv.ys[:, None]
    base = lung.cy + lung.b * lung.base            # where the diaphragm meets the chest wall
    height = rng.uniform(0.15, 0.25)
    across = np.clip((X - (lung.cx - lateral * lung.a)) * lateral / (2 * lung.a), 0.0, 1.0)
    top = base - height * (0.35 + 0.65 * across ** 2)   # the meniscus: higher laterally
    inside = (np.abs(X - lung.cx) < lung.a * 1.05) & (Y > top)
    return rng.uniform(0.42, 0.48) * _soft((inside * lungs_hard).astype(np.float32), 0.01 * cv.unit)


def _pneumothorax(cv: _Canvas, an: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(air, visceral pleural line, collapsed lung) masks (float32, canvas shape) of a pneumothorax: one lung
    pulled away from the apex and the chest wall, leaving a rim of air without vessel markings, its edge a thin
    bright line."""
    which = int(rng.integers(0, 2))
    lung = (an.right_lung, an.left_lung)[which]
    lateral = -1.0 if which == 0 else 1.0
    gap = rng.uniform(0.05, 0.09)
    shrunk = _Lung(cx=lung.cx - lateral * 0.6 * gap, cy=lung.cy + 0.6 * gap, a=lung.a - gap,
                   b=lung.b - 0.8 * gap, dome=lung.dome, base=lung.base)
    full, inner = _lung_mask(cv, lung), _lung_mask(cv, shrunk)
    air = np.clip(full - inner, 0.0, 1.0)
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.morphologyEx(inner, cv2.MORPH_GRADIENT, kernel) * cv2.dilate(air, kernel)
    edge *= (cv.ys < lung.cy + 0.5 * lung.b).astype(np.float32)[:, None]  # the apex and the side, not the base
    return air, edge, inner


def render_findings(rng: np.random.Generator, size: int | tuple[int, int], findings) -> np.ndarray:
    """Render one synthetic frontal chest radiograph showing `findings` (any of `FINDINGS`, several at once):
    an enlarged heart, a lobar consolidation, a pleural effusion with its meniscus, a pneumothorax's
    collapsed lung edge. uint8 (height, width), as `render_radiograph`."""
    findings = set(findings)
    unknown = findings - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; the sample renders {', '.join(FINDINGS)}")
    h, w = _as_hw(size)
    an = _sample_anatomy(rng)
    if "Cardiomegaly" in findings:
        an = _enlarged_heart(an, rng)
    H, W = int(round(h * 1.3)), int(round(w * 1.3))
    cv = _Canvas((H, W), (W / 2.0, H / 2.0), float(min(h, w)))
    air = line = collapsed = None
    if "Pneumothorax" in findings:
        air, line, collapsed = _pneumothorax(cv, an, rng)
    img, lungs_hard = _compose_chest(cv, an, rng, no_markings=None if air is None else _soft(air, 0.006 * cv.unit))
    pleura = _soft(lungs_hard, 0.024 * cv.unit)
    if "Consolidation" in findings:
        img += _draw_opacities(cv, an, lungs_hard, rng, "bacteria") * pleura
    if air is not None:
        img -= 0.05 * _soft(air, 0.004 * cv.unit)                     # air alone: darker than lung
        img += 0.05 * _soft(collapsed, 0.01 * cv.unit) * pleura        # the collapsed lung: denser
        img += 0.12 * _soft(line, 0.003 * cv.unit)                     # the visceral pleural line
    if "Effusion" in findings:
        img += _draw_effusion(cv, an, lungs_hard, rng)
    return _film(_random_pose(img, rng, (h, w)), rng)


def stamp_synthetic(img: np.ndarray) -> np.ndarray:
    """Burn a small "SYNTHETIC" label into the top-left corner (uint8, copy)."""
    out = img.copy()
    h, w = out.shape
    scale = 0.28 * min(h, w) / 256.0 + 0.05
    org = (max(2, w // 64), max(8, int(round(12 * min(h, w) / 256.0))))
    cv2.putText(out, "SYNTHETIC", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 235, 1, cv2.LINE_8)
    return out


def encode_jpeg(img: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) image as baseline JPEG bytes with a COM segment.

    Fixed quality and no optimisation/progressive mode keep bytes identical
    across runs; the comment marks the file as synthetic.
    """
    ok, buf = cv2.imencode(".jpeg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                                          cv2.IMWRITE_JPEG_OPTIMIZE, 0,
                                          cv2.IMWRITE_JPEG_PROGRESSIVE, 0])
    if not ok:
        raise RuntimeError("OpenCV failed to encode JPEG")
    data = buf.tobytes()
    # Insert the COM segment after SOI and the JFIF APP0 segment if present.
    pos = 2
    if data[2:4] == b"\xff\xe0":
        pos = 4 + int.from_bytes(data[4:6], "big")
    com = b"\xff\xfe" + (len(JPEG_COMMENT) + 2).to_bytes(2, "big") + JPEG_COMMENT
    return data[:pos] + com + data[pos:]
