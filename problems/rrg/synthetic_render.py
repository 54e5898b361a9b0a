"""Procedural chest X-ray images for :class:`~mtl_opt.problems.rrg.synthetic.SyntheticCXR`.

Images are drawn on a unit square (x left to right, y top to bottom) and sampled at any size. The
frontal view follows the radiological convention: the patient's right is on the image's left.
Anatomy: a soft-tissue body, two dark lung fields, a bright spine and mediastinum, a heart whose
width is the cardiothoracic ratio (CTR) times the thoracic width, curved ribs and faint vessel
markings. Findings are drawn where a radiologist looks for them:

* cardiomegaly: CTR 0.56 / 0.61 / 0.66 (mild / moderate / severe) instead of 0.40-0.48; an AP
  (portable) view magnifies the heart by 12 % whatever its size;
* pleural effusion: fluid density filling the lung base up to 12 / 28 / 45 % of its height, with a
  meniscus that rises laterally (the costophrenic angle is blunted first);
* pneumothorax: an apical-lateral rim of the lung without markings (very dark) bounded by a thin
  bright visceral pleural line; rim width 6 / 12 / 20 % of the lung width;
* consolidation: a dense textured patch in one lobe (upper / middle / lower zone);
* nodule (6-12 mm equivalent) or mass (> 3 cm equivalent): a round dense disc in a lung;
* oedema: bilateral perihilar haze, stronger with severity;
* atelectasis: a thin dense horizontal band at a lung base;
* support devices: endotracheal tube, nasogastric tube, central line, pacemaker with lead — thin
  lines of metal density;
* fracture: a gap with a step in one rib.

The lateral view (second view when ``views=2``) shows the heart anteriorly, the spine posteriorly,
effusions in the posterior costophrenic sulcus, and the lung findings; a pneumothorax is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIDES = ("right", "left", "bilateral")
SIZES = ("small", "moderate", "large")
SEVERITIES = ("mild", "moderate", "severe")
LOBES = ("upper", "middle", "lower")
DEVICES = ("endotracheal tube", "nasogastric tube", "central line", "pacemaker")

# Lung field ellipses (centre x, centre y, half-width, half-height); index 0 right, 1 left.
LUNGS = ((0.31, 0.47, 0.15, 0.30), (0.69, 0.47, 0.145, 0.30))
THORAX_WIDTH = 0.62
HEART_CENTRE = (0.545, 0.68)
NORMAL_CTR = (0.40, 0.48)
CARDIOMEGALY_CTR = {"mild": 0.56, "moderate": 0.61, "severe": 0.66}
AP_MAGNIFICATION = 1.12
EFFUSION_HEIGHT = {"small": 0.12, "moderate": 0.28, "large": 0.45}
PNEUMOTHORAX_RIM = {"small": 0.06, "moderate": 0.12, "large": 0.20}
LOBE_Y = {"upper": -0.15, "middle": 0.0, "lower": 0.14}

RIB_FIRST, RIB_SPACING, RIB_HALF_THICKNESS = 0.22, 0.065, 0.011
TISSUE, LUNG, BONE, FLUID, METAL, AIR = 0.38, 0.13, 0.60, 0.50, 0.97, 0.03


@dataclass
class Finding:
    """One drawn finding: where, how big, how severe (fields unused by a finding are ignored)."""

    side: str = "right"          # right / left / bilateral
    size: str = "moderate"       # small / moderate / large (effusion, pneumothorax, lesions)
    severity: str = "moderate"   # mild / moderate / severe (cardiomegaly, oedema, consolidation)
    lobe: str = "lower"          # upper / middle / lower
    kind: str = ""               # nodule / mass; device names for support devices
    devices: tuple[str, ...] = ()
    position: tuple[float, float] = (0.0, 0.0)  # small offset inside the lobe, unit square


@dataclass
class Study:
    """The generator's truth for one study: its view, anatomy and findings."""

    view: str = "PA"                                  # PA or AP
    ctr: float = 0.45                                 # true cardiothoracic ratio
    findings: dict[str, Finding] = field(default_factory=dict)
    shift: tuple[float, float] = (0.0, 0.0)           # patient positioning offset
    anatomy_seed: int = 0                             # ribs, markings, noise


def _sides(side: str) -> tuple[int, ...]:
    return {"right": (0,), "left": (1,), "bilateral": (0, 1)}[side]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _segment_distance(x: np.ndarray, y: np.ndarray, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    px, py = p
    qx, qy = q
    dx, dy = qx - px, qy - py
    t = np.clip(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (px + t * dx), y - (py + t * dy))


def _polyline(img: np.ndarray, x: np.ndarray, y: np.ndarray, points, width: float, value: float) -> None:
    d = np.full(img.shape, np.inf)
    for p, q in zip(points[:-1], points[1:]):
        d = np.minimum(d, _segment_distance(x, y, p, q))
    img[d < width] = value


def _smooth_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """Sum of ``n`` random isotropic Gaussian bumps; separable, so one (H, n) x (n, W) product."""
    cx, cy, a = rng.uniform(0.1, 0.9, n), rng.uniform(0.15, 0.85, n), rng.uniform(-1, 1, n)
    xs, ys = x[0, :], y[:, 0]
    gx = np.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * sigma**2))   # (n, W)
    gy = np.exp(-((ys[:, None] - cy[None, :]) ** 2) / (2 * sigma**2))   # (H, n)
    return (gy * a[None, :]) @ gx


def heart_half_width(study: Study) -> float:
    """Half-width of the drawn heart in unit coordinates (CTR x thoracic width / 2, AP-magnified)."""
    ctr = study.ctr
    f = study.findings.get("cardiomegaly")
    if f is not None:
        ctr = CARDIOMEGALY_CTR[f.severity]
    half = ctr * THORAX_WIDTH / 2
    return half * (AP_MAGNIFICATION if study.view == "AP" else 1.0)


def render_frontal(study: Study, size: int, noise: float = 0.02) -> np.ndarray:
    """A frontal (PA or AP) radiograph of ``study`` as a float32 array (size, size) in [0, 1]."""
    rng = np.random.default_rng(study.anatomy_seed)
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    x = x - study.shift[0]
    y = y - study.shift[1]
    img = np.full((size, size), AIR, dtype=np.float64)
    img[_ellipse(x, y, 0.5, 0.56, 0.45, 0.52) < 1] = TISSUE
    lung_masks = [_ellipse(x, y, *lung) < 1 for lung in LUNGS]
    lungs = lung_masks[0] | lung_masks[1]
    markings = 0.04 * _smooth_field(rng, x, y, 24, 0.04)
    img[lungs] = LUNG + markings[lungs]
    # Ribs: nine curved bands over the thorax, sloping down laterally. ``d`` is the height above
    # the rib curve's shape, so rib k is the set |d - top_k| < half-thickness.
    d = y - (0.10 * (np.abs(x - 0.5) - 0.1) - 0.03 * np.cos(np.pi * (x - 0.5) * 3))
    k = np.rint((d - RIB_FIRST) / RIB_SPACING)
    offset = d - RIB_FIRST - RIB_SPACING * k
    in_thorax = (np.abs(x - 0.5) > 0.05) & (np.abs(x - 0.5) < 0.36) & (k >= 0) & (k < 9)
    rib_band = in_thorax & (np.abs(offset) < RIB_HALF_THICKNESS)
    fracture = study.findings.get("fracture")
    if fracture is not None:
        # A gap and a step: the lateral fragment of one rib (4th to 7th) is displaced downwards.
        rib = 3 + int(np.random.default_rng([study.anatomy_seed, 7]).integers(0, 4))
        cx = 0.24 if fracture.side == "right" else 0.76
        lateral = (np.abs(x - cx) < 0.08) & ((x > cx) if fracture.side == "right" else (x < cx))
        this_rib = np.abs(d - RIB_FIRST - RIB_SPACING * rib) < 0.05
        rib_band &= ~(this_rib & ((np.abs(x - cx) < 0.012) | lateral))
        step = lateral & (np.abs(x - cx) >= 0.012) \
            & (np.abs(d - RIB_FIRST - RIB_SPACING * rib - 0.012) < RIB_HALF_THICKNESS)
        rib_band |= step
    img[rib_band] += 0.13
    # Spine and mediastinum.
    img[(np.abs(x - 0.5) < 0.045) & (y > 0.05)] = BONE
    img[(np.abs(x - 0.5) < 0.012) & (y > 0.08) & (y < 0.36)] = LUNG  # trachea
    # Heart.
    half = heart_half_width(study)
    cx, cy = HEART_CENTRE
    heart = _ellipse(x, y, cx, cy, half, 0.13) < 1
    img[heart] = 0.58
    # Diaphragm below the lungs.
    img[(y > 0.80) & (np.abs(x - 0.5) < 0.42) & ~lungs] = 0.52

    f = study.findings
    if "edema" in f:
        amp = {"mild": 0.10, "moderate": 0.18, "severe": 0.28}[f["edema"].severity]
        haze = amp * (np.exp(-((x - 0.36) ** 2 + (y - 0.50) ** 2) / (2 * 0.11**2))
                      + np.exp(-((x - 0.64) ** 2 + (y - 0.50) ** 2) / (2 * 0.11**2)))
        img[lungs] += haze[lungs]
    if "consolidation" in f:
        g = f["consolidation"]
        amp = {"mild": 0.22, "moderate": 0.32, "severe": 0.42}[g.severity]
        for s in _sides(g.side):
            lx, ly, ax, ay = LUNGS[s]
            bx = lx + g.position[0] * ax
            by = ly + LOBE_Y[g.lobe] + g.position[1] * ay * 0.3
            blob = np.exp(-((x - bx) ** 2 / (2 * 0.06**2) + (y - by) ** 2 / (2 * 0.05**2)))
            texture_rng = np.random.default_rng([study.anatomy_seed, 8, s])
            texture = 0.8 + 0.4 * (_smooth_field(texture_rng, x, y, 12, 0.02) > 0)
            img[lung_masks[s]] += (amp * blob * texture)[lung_masks[s]]
    if "atelectasis" in f:
        g = f["atelectasis"]
        for s in _sides(g.side):
            lx, ly, ax, ay = LUNGS[s]
            band = (np.abs(y - (ly + 0.20)) < 0.012) & (np.abs(x - lx) < ax * 0.7) & lung_masks[s]
            img[band] += 0.30
    for name in ("nodule", "mass"):
        if name in f:
            g = f[name]
            s = _sides(g.side)[0]
            lx, ly, ax, ay = LUNGS[s]
            radius = {"nodule": 0.022, "mass": 0.07}[name] * {"small": 0.8, "moderate": 1.0, "large": 1.25}[g.size]
            bx = lx + g.position[0] * ax * 0.5
            by = ly + LOBE_Y[g.lobe] + g.position[1] * 0.05
            disc = _ellipse(x, y, bx, by, radius, radius) < 1
            img[disc] = np.maximum(img[disc], 0.55)
    if "effusion" in f:
        g = f["effusion"]
        for s in _sides(g.side):
            lx, ly, ax, ay = LUNGS[s]
            bottom = ly + ay
            level = bottom - EFFUSION_HEIGHT[g.size] * 2 * ay
            lateral = np.clip(np.abs(x - lx) / ax * np.sign((x - lx) * (1 if s == 1 else -1)), 0, 1)
            meniscus = level - 0.06 * lateral**2
            fluid = lung_masks[s] & (y > meniscus)
            img[fluid] = FLUID
    if "pneumothorax" in f:
        g = f["pneumothorax"]
        for s in _sides(g.side):
            lx, ly, ax, ay = LUNGS[s]
            rim = PNEUMOTHORAX_RIM[g.size]
            r = _ellipse(x, y, lx, ly, ax, ay)
            outward = (x - lx) * (1 if s == 1 else -1)
            region = lung_masks[s] & (r > (1 - rim) ** 2) & (y < ly + 0.05) & ((outward > 0) | (y < ly - 0.15))
            img[region] = AIR
            line = lung_masks[s] & (np.abs(np.sqrt(r) - (1 - rim)) < 0.02) & (y < ly + 0.05) \
                & ((outward > 0) | (y < ly - 0.15))
            img[line] = 0.40
    if "devices" in f:
        devs = f["devices"].devices
        w = 0.006
        if "endotracheal tube" in devs:
            _polyline(img, x, y, [(0.5, 0.0), (0.5, 0.30)], w, METAL)
        if "nasogastric tube" in devs:
            _polyline(img, x, y, [(0.49, 0.0), (0.49, 0.78), (0.58, 0.86), (0.64, 0.86)], w, METAL)
        if "central line" in devs:
            _polyline(img, x, y, [(0.18, 0.16), (0.36, 0.22), (0.46, 0.30), (0.46, 0.42)], w, METAL)
        if "pacemaker" in devs:
            box = (np.abs(x - 0.76) < 0.04) & (np.abs(y - 0.18) < 0.025)
            img[box] = METAL
            _polyline(img, x, y, [(0.76, 0.18), (0.55, 0.30), (0.50, 0.55), (0.56, 0.70)], w, METAL)

    img = img + noise * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_lateral(study: Study, size: int, noise: float = 0.02) -> np.ndarray:
    """A lateral radiograph of ``study`` (anterior on the image's left) in [0, 1]."""
    rng = np.random.default_rng(study.anatomy_seed + 1)
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    x = x - study.shift[0]
    y = y - study.shift[1]
    img = np.full((size, size), AIR, dtype=np.float64)
    img[_ellipse(x, y, 0.5, 0.55, 0.40, 0.50) < 1] = TISSUE
    lung = _ellipse(x, y, 0.52, 0.47, 0.30, 0.32) < 1
    img[lung] = LUNG + 0.04 * _smooth_field(rng, x, y, 16, 0.05)[lung]
    img[(np.abs(x - 0.82) < 0.06) & (y > 0.1)] = BONE  # spine
    half = heart_half_width(study) * 0.9
    img[_ellipse(x, y, 0.30 + half * 0.5, 0.64, half, 0.15) < 1] = 0.58
    f = study.findings
    if "effusion" in f:
        level = 0.79 - EFFUSION_HEIGHT[f["effusion"].size] * 0.5
        img[lung & (y > level - 0.08 * np.clip((x - 0.5) / 0.3, 0, 1)) & (x > 0.45)] = FLUID
    if "consolidation" in f:
        g = f["consolidation"]
        blob = np.exp(-((x - 0.6) ** 2 + (y - 0.47 - LOBE_Y[g.lobe]) ** 2) / (2 * 0.06**2))
        img[lung] += 0.3 * blob[lung]
    if "edema" in f:
        haze = 0.15 * np.exp(-((x - 0.55) ** 2 + (y - 0.5) ** 2) / (2 * 0.14**2))
        img[lung] += haze[lung]
    for name, radius in (("nodule", 0.022), ("mass", 0.07)):
        if name in f:
            g = f[name]
            disc = _ellipse(x, y, 0.55, 0.47 + LOBE_Y[g.lobe], radius, radius) < 1
            img[disc] = np.maximum(img[disc], 0.55)
    if "devices" in f:
        devs = f["devices"].devices
        if "endotracheal tube" in devs or "nasogastric tube" in devs:
            _polyline(img, x, y, [(0.45, 0.0), (0.48, 0.30)], 0.006, METAL)
        if "pacemaker" in devs:
            img[(np.abs(x - 0.3) < 0.03) & (np.abs(y - 0.2) < 0.02)] = METAL
    img = img + noise * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
