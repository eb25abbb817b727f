"""Procedurally rendered chest radiographs for the synthetic data generator.

Why procedural: the simulator needs images whose findings are *known* (planted truth) and whose nuisance
variation (habitus, exposure, positioning, noise, monitoring leads) is realistic enough that an image model
has to learn the finding rather than a rendering artefact. Nothing here is learned from or copied out of real
images.

How: a radiograph is a projection, so we build a density map - how strongly each ray is attenuated - by
adding simple analytic shapes evaluated on a coordinate grid: soft tissue, minus the air in each lung, plus
bones, vessels and the heart. Findings act the way they act on a film: consolidation, pleural fluid and
oedema *replace air*, a pneumothorax *adds air* and removes lung markings, devices add metal or plastic.
A film-like characteristic curve (a sigmoid whose centre and slope follow exposure and body size) turns
density into grey levels; quantum noise is added last at the output resolution.

Geometry lives in a patient frame (u, v) in about [-1, 1]: u grows to the image right (the patient's left,
radiographic convention), v grows downward. A random pose (rotation, scale, shift) maps the pixel grid into
that frame, so every shape moves with the patient. Shapes are evaluated only inside their bounding box and at
an internal resolution of at most 256 px, then upsampled: a 512 px image costs a few milliseconds.

Randomness: exactly one integer is drawn from the caller's generator; each component (pose, anatomy, vessels,
each finding, ...) then draws from its own sub-stream of it. The patient and the acquisition therefore do not
depend on which findings are present: the same seed rendered with and without a finding shows the same
patient with and without it. Rules and parameters: docs/synthetic_radiographs.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from carebench.errors import UserError

FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "consolidation_left",
    "consolidation_right",
    "effusion_left",
    "effusion_right",
    "edema",
    "atelectasis",
    "pneumothorax",
    "ett",
    "central_line",
    "pacemaker",
)
"""Finding keys of `render_radiograph` (severity 0..1; a device is drawn when its value is > 0)."""

PATIENT_KEYS: tuple[str, ...] = ("body_size", "exposure")
"""Patient/acquisition keys (0..1, default 0.5): habitus (soft tissue, scatter) and radiographic exposure."""

VIEWS: tuple[str, ...] = ("AP", "PA", "LATERAL")
MIN_SIZE = 32
_INTERNAL_MAX = 256
_NOISE_TILE = 512
_F32 = np.float32

# One sub-stream per component, so adding or removing a finding never shifts another component's draws.
_STREAMS = {
    name: i
    for i, name in enumerate(
        ("pose", "anatomy", "markings", "texture", "develop", "leads", *FINDINGS), start=1
    )
}


class RadiographArgumentError(UserError, ValueError):
    """A bad argument to `render_radiograph`; the message names the argument and what was expected."""


def render_radiograph(
    rng: np.random.Generator, findings: Mapping[str, float], size: int, view: str = "AP"
) -> np.ndarray:
    """Render one chest radiograph as uint8 ``[size, size]`` (dark = air, bright = bone and metal).

    ``findings`` maps keys of `FINDINGS` to a severity in [0, 1] (absent = 0) and may set `PATIENT_KEYS`
    (default 0.5). ``view``: "AP" (portable: magnified heart, lower lung volumes, scapulae over the lungs,
    more rotation and noise, often monitoring leads), "PA" (erect departmental film) or "LATERAL" (side
    profile, patient facing the image left). Consumes exactly one draw from ``rng``.
    """
    sev = _validate(rng, findings, size, view)
    seed = int(rng.integers(0, 2**63 - 1, dtype=np.int64))
    scene = _Scene.create(seed, min(int(size), _INTERNAL_MAX), view, sev)
    if view == "LATERAL":
        _draw_lateral(scene)
    else:
        _draw_frontal(scene)
    return _develop(scene, int(size))


def _validate(rng: object, findings: object, size: object, view: object) -> dict[str, float]:
    if not isinstance(rng, np.random.Generator):
        raise RadiographArgumentError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(view, str) or view not in VIEWS:
        raise RadiographArgumentError(f"view: expected one of {', '.join(VIEWS)}, got {view!r}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise RadiographArgumentError(f"size: expected an integer >= {MIN_SIZE}, got {size!r}")
    if not isinstance(findings, Mapping):
        raise RadiographArgumentError(
            f"findings: expected a mapping of finding -> severity, got {type(findings).__name__}"
        )
    sev = dict.fromkeys(FINDINGS, 0.0) | dict.fromkeys(PATIENT_KEYS, 0.5)
    for key, value in findings.items():
        if key not in sev:
            raise RadiographArgumentError(
                f"findings: unknown key {key!r}; expected keys among {', '.join(FINDINGS + PATIENT_KEYS)}"
            )
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not 0.0 <= x <= 1.0:
            raise RadiographArgumentError(f"findings[{key!r}]: expected a number in [0, 1], got {value!r}")
        sev[key] = x
    return sev


# ------------------------------------------------------------------------------------------------ helpers


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 (x <= -width/2) to 1 (x >= width/2): an anti-aliased, partial-volume edge."""
    y = x * _F32(1.0 / width)
    y += _F32(0.5)
    return np.clip(y, 0.0, 1.0, out=y)


def _gauss2(a: np.ndarray, b: np.ndarray, sa: float, sb: float) -> np.ndarray:
    return np.exp(-((a * _F32(1.0 / sa)) ** 2) - (b * _F32(1.0 / sb)) ** 2)


@lru_cache(maxsize=8)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y down) at resolution ``res``."""
    c = ((np.arange(res) + 0.5) * (2.0 / res) - 1.0).astype(_F32)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed field of white Gaussian noise; each image uses a random crop and orientation of it.

    Fresh normals for a 512 px image cost about a third of the time budget; a random crop of a fixed tile
    has the same per-image statistics and carries no information about any finding.
    """
    tile = np.random.Generator(np.random.PCG64(20260101)).standard_normal(
        (_NOISE_TILE, _NOISE_TILE), dtype=_F32
    )
    tile.flags.writeable = False
    return tile


def _smooth_noise(g: np.random.Generator, res: int, cells: int) -> np.ndarray:
    """Band-limited noise with about ``cells`` blobs across the image (zero mean, std about 0.6)."""
    small = g.standard_normal((cells + 1, cells + 1)).astype(_F32)
    return np.asarray(Image.fromarray(small, mode="F").resize((res, res), Image.BICUBIC), dtype=_F32)


def _catmull_rom(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points on the Catmull-Rom spline through the control ``points`` [k, 2] (k >= 2)."""
    p = np.concatenate([2 * points[:1] - points[1:2], points, 2 * points[-1:] - points[-2:-1]])
    k = len(points) - 1
    s = np.linspace(0.0, k, n)
    i = np.minimum(s.astype(int), k - 1)
    t = (s - i)[:, None]
    p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
    return 0.5 * (
        2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3
    )


def _accumulate(res: int, px: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Bilinear splat of point masses at pixel coordinates ``px`` [n, 2] into a [res, res] float32 image.

    Points whose 2x2 footprint leaves the image are dropped (they only ever lie on the border).
    """
    x0 = np.floor(px[:, 0])
    y0 = np.floor(px[:, 1])
    ok = (x0 >= 0) & (x0 < res - 1) & (y0 >= 0) & (y0 < res - 1)
    x0, y0, mass = x0[ok], y0[ok], mass[ok]
    fx, fy = px[ok, 0] - x0, px[ok, 1] - y0
    base = y0.astype(np.int64) * res + x0.astype(np.int64)
    idx = np.concatenate([base, base + 1, base + res, base + res + 1])
    mfy = mass * fy
    m1fy = mass - mfy
    w = np.concatenate([m1fy - m1fy * fx, m1fy * fx, mfy - mfy * fx, mfy * fx])
    return np.bincount(idx, weights=w, minlength=res * res).reshape(res, res).astype(_F32)


def _blur121(img: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur (about a 0.7 px Gaussian): the unsharpness of a detector."""
    b = img * _F32(0.5)
    b[1:] += img[:-1] * _F32(0.25)
    b[:-1] += img[1:] * _F32(0.25)
    c = b * _F32(0.5)
    c[:, 1:] += b[:, :-1] * _F32(0.25)
    c[:, :-1] += b[:, 1:] * _F32(0.25)
    return c


@dataclass
class _Scene:
    """What one rendering shares: severities, pose, the grid in the patient frame and the density drawn."""

    seed: int
    res: int
    view: str
    sev: dict[str, float]
    pose: tuple[float, float, float, float]  # rotation (rad), scale, shift x, shift y (image units)
    u: np.ndarray
    v: np.ndarray
    density: np.ndarray
    lines: np.ndarray | None = None  # splatted thin structures (tubes, wires), blurred when flushed

    @classmethod
    def create(cls, seed: int, res: int, view: str, sev: dict[str, float]) -> _Scene:
        g = np.random.Generator(np.random.PCG64([seed, _STREAMS["pose"]]))
        # Portable AP films are taken in bed: more rotation and shift, a more variable field of view.
        rot_sd, shift_sd, lo, hi = {"PA": (1.5, 0.025, 0.95, 1.04), "AP": (3.5, 0.04, 0.9, 1.04)}.get(
            view, (2.0, 0.03, 0.93, 1.03)
        )
        theta = math.radians(rot_sd) * float(np.clip(g.standard_normal(), -2.5, 2.5))
        scale = float(g.uniform(lo, hi))
        tx, ty = (shift_sd * np.clip(g.standard_normal(2), -2.5, 2.5)).tolist()
        x, y = _grid(res)
        c, s = math.cos(theta) / scale, math.sin(theta) / scale
        xs, ys = x - _F32(tx), y - _F32(ty)
        u = xs * _F32(c) + ys * _F32(s)
        v = ys * _F32(c) - xs * _F32(s)
        return cls(seed, res, view, sev, (theta, scale, tx, ty), u, v, np.zeros((res, res), _F32))

    def stream(self, name: str) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, _STREAMS[name]]))

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """Patient-frame points [n, 2] -> pixel coordinates (column, row) at the internal resolution."""
        theta, scale, tx, ty = self.pose
        c, s = math.cos(theta) * scale, math.sin(theta) * scale
        half = self.res / 2.0
        p = np.asarray(points, dtype=np.float64)
        return np.column_stack(
            [
                (c * p[:, 0] - s * p[:, 1] + tx + 1) * half - 0.5,
                (s * p[:, 0] + c * p[:, 1] + ty + 1) * half - 0.5,
            ]
        )

    def patch(
        self, u0: float, u1: float, v0: float, v1: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """The pixel box covering the patient-frame box [u0, u1] x [v0, v1] (possibly empty) and its u, v.

        Shapes are evaluated only where they can be non-zero; this is what keeps rendering fast.
        """
        theta, scale, tx, ty = self.pose
        c, s, half, res = math.cos(theta) * scale, math.sin(theta) * scale, self.res / 2.0, self.res
        cols = [(c * a - s * b + tx + 1) * half - 0.5 for a in (u0, u1) for b in (v0, v1)]
        rows = [(s * a + c * b + ty + 1) * half - 0.5 for a in (u0, u1) for b in (v0, v1)]
        c0, c1 = min(max(math.floor(min(cols)) - 1, 0), res), min(max(math.ceil(max(cols)) + 2, 0), res)
        r0, r1 = min(max(math.floor(min(rows)) - 1, 0), res), min(max(math.ceil(max(rows)) + 2, 0), res)
        sl = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
        return sl, self.u[sl], self.v[sl]

    def splat(self, points: np.ndarray, value: float, width: float = 0.0) -> None:
        """Draw a smooth curve through control ``points`` (patient frame) as a line of ``value`` density.

        ``width`` is in patient units; lines thinner than a pixel are drawn one pixel wide with
        proportionally less density (partial volume). Bilinear splatting anti-aliases the line.
        """
        px = self.to_pixels(points)
        rough = float(np.sum(np.hypot(*np.diff(px, axis=0).T)))
        n = max(4, int(rough * 1.5))
        curve = _catmull_rom(px, n)
        length = float(np.hypot(*np.diff(curve, axis=0).T).sum())
        w_px = width * self.res / 2.0 * self.pose[1]
        offsets = [0.0] if w_px <= 1.0 else np.linspace(-(w_px - 1) / 2, (w_px - 1) / 2, math.ceil(w_px))
        mass = value * max(length, 1.0) / n * min(max(w_px, 1e-3), 1.0)
        tangent = np.gradient(curve, axis=0)
        normal = np.column_stack([-tangent[:, 1], tangent[:, 0]])
        normal /= np.maximum(np.hypot(normal[:, 0], normal[:, 1]), 1e-9)[:, None]
        pts = np.concatenate([curve + o * normal for o in offsets])
        acc = _accumulate(self.res, pts, np.full(len(pts), mass))
        self.lines = acc if self.lines is None else self.lines + acc

    def flush_lines(self) -> None:
        if self.lines is not None:
            self.density += _blur121(self.lines)
            self.lines = None


def _lung_markings(sc: _Scene, hila: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """Pulmonary vessel trees: from each hilum (u, v, lateral direction +-1) trunks fork three times,
    thinning and fading towards the periphery; blurred, they read as normal lung markings.

    Returns the density the vessels add where they are seen against air: the caller multiplies it by the air
    map, so vessels vanish behind the heart, inside consolidation (silhouette sign) and beyond the pleural
    line of a pneumothorax.
    """
    g = sc.stream("markings")
    pieces, widths = [], []
    for hu, hv, side in hila:
        n0 = 9
        phi = np.linspace(-1.65, 1.8, n0) + g.normal(0, 0.1, n0)  # angle from the lateral direction
        start = np.column_stack([hu + side * g.uniform(0.0, 0.06, n0), hv + g.normal(0, 0.05, n0)])
        length = g.uniform(0.15, 0.22, n0)
        width = np.full(n0, 0.024)
        for _level in range(4):
            d = np.column_stack([side * np.cos(phi), np.sin(phi)])
            wiggle = (g.normal(0, 0.12, len(phi)) * length)[:, None] * np.column_stack([-d[:, 1], d[:, 0]])
            mid = start + 0.5 * length[:, None] * d + wiggle
            end = start + length[:, None] * d
            pieces += [np.stack([start, mid], 1), np.stack([mid, end], 1)]
            widths += [width, width * 0.9]
            k = len(phi)
            phi = np.repeat(phi, 2) + (g.uniform(0.2, 0.5, (k, 2)) * (-1, 1)).ravel()
            start = np.repeat(end, 2, axis=0)
            length = np.repeat(length, 2) * g.uniform(0.65, 0.85, 2 * k)
            width = np.repeat(width, 2) * 0.72
    seg = np.concatenate(pieces)  # [n, (start, end), (u, v)]
    w = np.concatenate(widths)
    px = sc.to_pixels(seg.reshape(-1, 2)).reshape(seg.shape)
    w_px = w * (sc.res / 2 * sc.pose[1])
    delta = px[:, 1] - px[:, 0]
    length_px = np.hypot(delta[:, 0], delta[:, 1])
    n = np.ceil(length_px * 0.8).astype(int) + 1  # a sample every ~1.2 px: the blur below fills the gaps
    idx = np.repeat(np.arange(len(n)), n)
    t = (np.arange(idx.size) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
    pts = px[idx, 0] + delta[idx] * t[:, None]
    # A vessel seen side-on is denser the wider it is; wide ones get three parallel strokes for their width.
    mass = np.repeat(0.2 * (w / 0.024) ** 0.7 * w_px * length_px / n, n)
    wide = np.repeat(w_px > 1.3, n)
    normal = np.column_stack([-delta[:, 1], delta[:, 0]]) / np.maximum(length_px, 1e-9)[:, None]
    off = (w_px / 3)[idx[wide], None] * normal[idx[wide]]
    thick = mass[wide] / 3
    all_pts = np.concatenate([pts[~wide], pts[wide] - off, pts[wide], pts[wide] + off])
    all_mass = np.concatenate([mass[~wide], thick, thick, thick])
    layer = _accumulate(sc.res, all_pts, all_mass)
    return _blur121(_blur121(layer))


# ------------------------------------------------------------------------------------------------ frontal


@dataclass
class _Lung:
    """One lung's outline in side-local coordinates: r grows laterally from the midline, v downward."""

    apex_v: float
    base_v: float  # level of the costophrenic angle
    apex_r: float
    lateral_r: float
    medial_r: float
    dome_v: float  # top of the hemidiaphragm
    dome_r: float

    def mask(self, r: np.ndarray, v: np.ndarray, edge: float) -> tuple[np.ndarray, np.ndarray]:
        """Soft mask of the lung and its fractional height t (0 at the apex, 1 at the costophrenic angle)."""
        t = np.clip((v - _F32(self.apex_v)) * _F32(1.0 / (self.base_v - self.apex_v)), 0.0, 1.0)
        q = 1 - t
        # Rounded apex: the width grows like a half-ellipse, then the walls run nearly parallel.
        lateral = _F32(self.apex_r) + _F32(self.lateral_r - self.apex_r) * np.sqrt(t * (1 + q))
        medial = _F32(self.apex_r) - _F32(self.apex_r - self.medial_r) * np.sqrt(1 - q * q * q)
        m = _ramp(lateral - r, 2 * edge)
        m *= _ramp(r - medial, edge)
        m *= _ramp(self.diaphragm(r) - v, edge)
        m *= _ramp(v - _F32(self.apex_v), edge)
        return m, t

    def diaphragm(self, r: np.ndarray) -> np.ndarray:
        """Height of the hemidiaphragm: a dome, highest at dome_r, falling steeply into the lateral sulcus."""
        d = r - _F32(self.dome_r)
        lat_fall = (self.base_v + 0.05 - self.dome_v) / (self.lateral_r - self.dome_r) ** 2
        return _F32(self.dome_v) + np.where(d > 0, _F32(lat_fall), _F32(0.5)) * d * d

    def box(self, side: float) -> tuple[float, float, float, float]:
        """Patient-frame box (u0, u1, v0, v1) of this lung on image side ``side`` (-1 left, +1 right)."""
        a, b = sorted((side * (self.medial_r - 0.04), side * (self.lateral_r + 0.06)))
        return a, b, self.apex_v - 0.04, self.base_v + 0.12


@dataclass
class _Frontal:
    """Anatomy and acquisition parameters of one frontal film, drawn in a fixed order from one stream."""

    right: _Lung  # patient's right lung = image left
    left: _Lung
    lat: float  # lateral extent of the lungs
    skin: float  # half-width of the trunk
    shoulder_v: float
    heart: tuple[float, float, float, float, float]  # centre u, centre v, half-width, half-height, tilt
    spine_u: float
    spine_phase: float
    rib_phase: float
    rib_space: float
    rib_jitter: np.ndarray  # per rib: [offset in rib spacings, relative density]
    clav_v: float
    bubble: tuple[float, float] | None  # gastric air bubble (u, size)
    breast_r: float | None
    arms: bool
    scapula: float
    atelectasis: tuple[int, float, float, float]  # side (0 right, 1 left), r / lat, height above dome, angle

    @classmethod
    def draw(cls, g: np.random.Generator, view: str, sev: dict[str, float]) -> _Frontal:
        ap, body = view == "AP", sev["body_size"]

        def n() -> float:
            return float(np.clip(g.standard_normal(), -2.0, 2.0))

        lat = 0.78 * (0.96 + 0.08 * body) * (1 + 0.03 * n())
        apex = -0.70 + 0.03 * n() + (0.03 if ap else 0.0)
        base = 0.56 + 0.04 * n() - (0.08 if ap else 0.0)  # supine films: lower lung volumes
        dome_r = base - 0.24 + 0.03 * n()
        dome_l = dome_r + 0.05 + 0.015 * n()  # the right hemidiaphragm sits higher
        right = _Lung(apex, base, 0.33, lat, 0.105, dome_r, 0.40 * lat)
        left = _Lung(apex - 0.01, base + 0.03, 0.34, lat * 0.99, 0.085, dome_l, 0.42 * lat)
        cm = sev["cardiomegaly"]
        mag = 1.12 if ap else 1.0  # the heart is anterior: magnified on AP films
        ha = 0.38 * (1 + 0.05 * n()) * mag * (1 + 0.55 * cm)
        hb = 0.34 * (1 + 0.05 * n()) * mag * (1 + 0.18 * cm)
        hu = 0.10 + 0.02 * n() + 0.07 * cm
        hv = 0.5 * (dome_r + dome_l) - 0.03 + 0.05 * cm
        tilt = math.radians(22 + 5 * n())
        f = cls(
            right=right,
            left=left,
            lat=lat,
            skin=lat + 0.13 + 0.22 * body + 0.02 * n(),
            shoulder_v=-0.80 + 0.04 * n() - (0.04 if ap else 0.0),
            heart=(hu, hv, ha, hb, tilt),
            spine_u=0.012 * n(),
            spine_phase=float(g.uniform(0, 1)),
            rib_phase=float(g.uniform(-0.02, 0.02)),
            rib_space=0.118 * (1 + 0.04 * n()),
            clav_v=apex + 0.07 + 0.03 * n() - (0.06 if ap else 0.0),  # AP films are often lordotic
            bubble=(0.30 + 0.05 * n(), float(g.uniform(0.05, 0.11))) if g.uniform() < 0.65 else None,
            breast_r=float(g.uniform(0.22, 0.32)) * (0.8 + 0.5 * body) if g.uniform() < 0.45 else None,
            arms=bool(g.uniform() < (0.6 if ap else 0.15)),
            scapula=0.10 if ap else 0.035,  # scapulae are rotated off the lungs on a PA film
            atelectasis=(
                int(g.integers(2)),
                float(g.uniform(0.55, 0.78)),
                float(g.uniform(0.12, 0.32)),
                0.2 * n(),
            ),
            rib_jitter=np.column_stack([g.normal(0, 0.06, 12), g.uniform(0.75, 1.2, 12)]).astype(_F32),
        )
        # Atelectasis is volume loss: the hemidiaphragm on its side is pulled up.
        s_a = sev["atelectasis"]
        lung = right if f.atelectasis[0] == 0 else left
        lung.dome_v -= 0.06 * s_a
        lung.base_v -= 0.04 * s_a
        return f


_HILA = ((-0.16, -0.08, -1.0), (0.16, -0.11, 1.0))  # (u, v, lateral direction) of the right and left hilum


def _draw_frontal(sc: _Scene) -> None:
    a = _Frontal.draw(sc.stream("anatomy"), sc.view, sc.sev)
    air = np.zeros_like(sc.density)  # fraction of the beam path that is aerated lung
    trunk = _frontal_soft_tissue(sc, a)
    _frontal_lung_air(sc, a, air)
    markings = _lung_markings(sc, _HILA)
    markings, ptx_line = _frontal_findings(sc, a, air, markings)
    sc.density -= _F32(0.74) * air
    sc.density += markings * air
    if ptx_line is not None:
        sl, line = ptx_line
        sc.density[sl] += _F32(0.16) * line
    _frontal_mediastinum(sc, a, trunk)
    _frontal_bones(sc, a)
    _frontal_devices(sc, a)


def _frontal_soft_tissue(sc: _Scene, a: _Frontal) -> np.ndarray:
    """Trunk, neck, shoulders, arms and breasts; thickest in the midline. Returns the trunk mask."""
    u, v = sc.u, sc.v
    r = np.abs(u)
    # The trapezius slopes from the neck (top centre) down to the shoulders at the upper corners.
    shoulder = np.clip((r - _F32(0.2)) * _F32(1 / (a.skin - 0.2)), 0.0, 1.3)
    shoulder = _F32(-1.08) + _F32(a.shoulder_v + 1.08) * shoulder * np.sqrt(np.sqrt(shoulder))  # ~ x^0.75
    trunk = _ramp(_F32(a.skin) - r, 0.05)
    trunk *= _ramp(v - shoulder, 0.06)
    thick = np.sqrt(np.clip(1.0 - (r * _F32(1.0 / (a.skin + 0.04))) ** 2, 0.0, 1.0))
    sc.density += trunk * (_F32(0.3) + _F32(0.72) * thick + _F32(0.08) * _ramp(v - _F32(0.2), 0.8))
    # Shoulder girdle soft tissue always; the upper arms beside the chest only when they are in the field.
    arm_low = 0.6 if a.arms else a.shoulder_v + 0.45
    for side in (-1.0, 1.0):
        box = sorted((side * (a.skin - 0.01), side * (a.skin + 0.35)))
        sl, pu, pv = sc.patch(*box, a.shoulder_v - 0.05, arm_low + 0.1)
        ar = pu * _F32(side)
        arm = _ramp(ar - _F32(a.skin + 0.035), 0.04) * _ramp(_F32(a.skin + 0.3) - ar, 0.06)
        arm *= _ramp(pv - _F32(a.shoulder_v + 0.02), 0.1) * _ramp(_F32(arm_low) - pv, 0.15)
        sc.density[sl] += _F32(0.55) * arm
    if a.breast_r is not None:
        cv = a.right.base_v - 0.02
        for side in (-1, 1):
            cu = side * (a.lat - 0.22)
            sl, pu, pv = sc.patch(cu - a.breast_r - 0.05, cu + a.breast_r + 0.05, cv - 0.42, cv + 0.2)
            d = np.hypot(pu - _F32(cu), (pv - _F32(cv)) * _F32(1.25))
            b = (
                _ramp(_F32(a.breast_r) - d, 0.06)
                * _ramp(pv - _F32(cv - 0.36), 0.2)
                * _ramp(_F32(cv + 0.14) - pv, 0.15)
            )
            sc.density[sl] += _F32(0.12) * b
    return trunk


def _frontal_lung_air(sc: _Scene, a: _Frontal, air: np.ndarray) -> None:
    """Air in each lung: less near the mediastinum, the apex and the lateral edge; the heart, aortic knob and
    great vessels displace it."""
    edge = max(2.2 / sc.res, 0.012)
    for side, lung in ((-1.0, a.right), (1.0, a.left)):
        sl, pu, pv = sc.patch(*lung.box(side))
        r = pu * _F32(side)
        m, t = lung.mask(r, pv, edge)
        m *= _F32(0.6) + _F32(0.4) * _ramp(r - _F32(0.22), 0.3)
        m *= _F32(0.72) + _F32(0.28) * _ramp(_F32(a.lat - 0.03) - r, 0.18)
        m *= _F32(0.7) + _F32(0.3) * _ramp(t - _F32(0.12), 0.25)
        air[sl] += m
    hu, hv, ha, hb, tilt = a.heart
    sl, pu, pv = sc.patch(hu - 0.8 * ha, hu + 1.2 * ha, hv - 1.3 * hb, hv + 1.3 * hb)
    air[sl] *= 1 - _F32(0.85) * _heart(pu, pv, hu, hv, ha, hb, tilt)
    sl, pu, pv = sc.patch(-0.2, 0.22, -1.2, 1.2)
    band = _ramp(_F32(0.085) + _F32(0.045) * _ramp(pv + _F32(0.12), 0.3) - np.abs(pu - _F32(0.015)), 0.05)
    knob = _ramp(_F32(0.065) - np.hypot(pu - _F32(0.115), pv + _F32(0.36)), 0.02)
    air[sl] *= 1 - _F32(0.85) * np.maximum(band, knob)


def _heart(
    u: np.ndarray, v: np.ndarray, hu: float, hv: float, ha: float, hb: float, tilt: float
) -> np.ndarray:
    """Cardiac silhouette: a short, gently convex right atrial border (image left) and a long left
    ventricular border sweeping down to the apex (image right); the lower half hides below the diaphragm."""
    ct, st = math.cos(tilt), math.sin(tilt)
    du, dv = u - _F32(hu), v - _F32(hv)
    right = 1.0 - (du * _F32(1 / (0.72 * ha))) ** 2 - (dv * _F32(1 / (1.25 * hb))) ** 2
    dl = dv - _F32(0.04)
    lx = (du * _F32(ct) + dl * _F32(st)) * _F32(1 / ha)
    ly = (dl * _F32(ct) - du * _F32(st)) * _F32(1 / (1.1 * hb))
    left = 1.0 - lx * lx - ly * ly
    return _ramp(np.where(du < 0, right, left), 0.12)


def _frontal_findings(
    sc: _Scene, a: _Frontal, air: np.ndarray, markings: np.ndarray
) -> tuple[np.ndarray, tuple[tuple[slice, slice], np.ndarray] | None]:
    """Parenchymal and pleural findings: they change the air map (and the visible vessel markings)."""
    sev, ap, res = sc.sev, sc.view == "AP", sc.res
    mottle = (
        _smooth_noise(sc.stream("texture"), res, 14) if sev["edema"] > 0 or sev["atelectasis"] > 0 else None
    )
    for side, lung, name in ((-1.0, a.right, "right"), (1.0, a.left, "left")):
        s_c = sev[f"consolidation_{name}"]
        if s_c > 0:  # patchy lower-zone airspace opacity with air bronchograms
            gc = sc.stream(f"consolidation_{name}")
            cr, cv = float(gc.uniform(0.32, 0.55)) * a.lat, float(gc.uniform(0.0, 0.18)) + lung.dome_v - 0.3
            sr, sv = 0.16 + 0.14 * s_c, 0.13 + 0.14 * s_c
            patch = _smooth_noise(gc, res, 10)
            sl, pu, pv = sc.patch(
                *sorted((side * (cr - 2.6 * sr), side * (cr + 2.6 * sr))), cv - 2.6 * sv, cv + 2.6 * sv
            )
            region = _gauss2(pu * _F32(side) - _F32(cr), pv - _F32(cv), sr, sv)
            opac = np.clip(region * (_F32(1.1) + _F32(0.45) * patch[sl]) * _F32(1.15 * s_c**0.7), 0.0, 0.95)
            air[sl] *= 1 - opac
            air[sl] += _F32(0.45) * opac * markings[sl] * (pu * _F32(side) > _F32(0.12))
        s_e = sev[f"effusion_{name}"]
        if s_e > 0:  # dependent fluid: blunted costophrenic angle, meniscus, dense base
            level = lung.base_v + 0.06 - (0.02 + 0.55 * s_e) * (lung.base_v - lung.apex_v)
            u0, u1, _, _ = lung.box(side)
            v0 = lung.apex_v if ap else level - 0.6
            sl, pu, pv = sc.patch(u0, u1, v0, lung.base_v + 0.15)
            r = pu * _F32(side)
            # Meniscus: fluid climbs the lateral chest wall: its upper edge is concave, highest laterally.
            x = np.clip((r - _F32(lung.medial_r)) * _F32(1 / (lung.lateral_r - lung.medial_r)), 0.0, 1.1)
            meniscus = _F32(0.12 + 0.22 * s_e) * x * x * x * np.sqrt(x) + _F32(0.03) * x
            fluid = _ramp(pv - _F32(level) + meniscus, 0.08 + 0.06 * s_e) * _ramp(r, 0.02)
            fluid *= _F32(0.75) + _F32(0.25) * _ramp(pv - _F32(level), 0.3)
            if ap:  # supine: part of the fluid layers posteriorly as a veil over the whole hemithorax
                fluid = np.maximum(fluid, _F32(0.35 * s_e) * _ramp(pv - _F32(lung.apex_v + 0.3), 0.6))
            fluid *= _F32(min(1.0, 10 * s_e))  # a trace of fluid is faint, not a step
            air[sl] *= 1 - _F32(0.93) * fluid
            # Pleural fluid is also seen beyond the aerated lung, up to the chest wall and down to the sulcus.
            pleural = _ramp(_F32(lung.lateral_r + 0.03) - r, 0.04) * _ramp(r - _F32(0.1), 0.05)
            pleural *= _ramp(lung.diaphragm(r) + _F32(0.03) - pv, 0.05)
            sc.density[sl] += _F32(0.1) * fluid * pleural
    s_ed = sev["edema"]
    if s_ed > 0:  # bilateral perihilar (bat-wing) haze with engorged, indistinct vessels
        assert mottle is not None
        haze = np.zeros_like(air)
        for hu, hv, _ in _HILA:
            haze += _gauss2(
                sc.u - _F32(hu * 1.3), sc.v - _F32(hv + 0.05), 0.26 + 0.12 * s_ed, 0.34 + 0.1 * s_ed
            )
        haze *= (_F32(0.85) + _F32(0.35) * mottle) * _F32(0.8 * s_ed)
        air *= 1 - np.clip(haze, 0.0, 0.9)
        markings = markings * _F32(1.0 + 0.8 * s_ed)
    s_a = sev["atelectasis"]
    if s_a > 0:  # plate-like band, slightly curved, tapering at both ends
        assert mottle is not None
        side_i, ar, above, ang = a.atelectasis
        side = -1.0 if side_i == 0 else 1.0
        av = (a.right if side_i == 0 else a.left).dome_v - above  # lower zone, above the (raised) dome
        cr = ar * a.lat
        length = 0.12 + 0.14 * s_a
        sl, pu, pv = sc.patch(
            *sorted((side * (cr - length - 0.1), side * (cr + length + 0.1))), av - 0.25, av + 0.25
        )
        ca, sa = math.cos(ang), math.sin(ang)
        du, dv = pu * _F32(side) - _F32(cr), pv - _F32(av)
        along = du * _F32(ca) + dv * _F32(sa)
        across = dv * _F32(ca) - du * _F32(sa) - _F32(0.6) * along * along
        thick = _F32(0.01 + 0.03 * s_a) * np.sqrt(np.clip(1 - (along * _F32(1 / length)) ** 2, 0.0, 1.0))
        band = _ramp(thick - np.abs(across), 0.02) * (_F32(0.6) + _F32(0.4) * mottle[sl])
        air[sl] *= 1 - _F32(0.85) * band
        # ... with ill-defined subsegmental collapse at the base of the same lung
        lung = a.right if side_i == 0 else a.left
        sl, pu, pv = sc.patch(*lung.box(side))
        basal = _gauss2(pu * _F32(side) - _F32(0.55 * a.lat), pv - _F32(lung.dome_v + 0.02), 0.22, 0.12)
        air[sl] *= 1 - _F32(0.35 * s_a) * basal * (_F32(0.7) + _F32(0.3) * mottle[sl])
    ptx_line = None
    s_p = sev["pneumothorax"]
    if s_p > 0:  # the lung falls away from the apex and lateral wall; free air without markings
        side_i = int(sc.stream("pneumothorax").integers(2))
        side, lung = (-1.0, a.right) if side_i == 0 else (1.0, a.left)
        c = 0.06 + 0.39 * s_p
        ar, av = 0.16, lung.dome_v - 0.05
        sl, pu, pv = sc.patch(*lung.box(side))
        r = pu * _F32(side)
        edge = max(2.2 / res, 0.012)
        outer, _ = lung.mask(r, pv, edge)
        rs = np.where(r > ar, _F32(ar) + (r - _F32(ar)) * _F32(1 / (1 - c)), r)
        vs = np.where(pv < av, _F32(av) + (pv - _F32(av)) * _F32(1 / (1 - c)), pv)
        inner, _ = lung.mask(rs, vs, 0.012)
        # The lung stays attached at the hilum: the medial lower strip never separates.
        attached = _ramp(_F32(ar + 0.03) - r, 0.04) * _ramp(pv - _F32(lung.apex_v + 0.3 + 0.3 * c), 0.1)
        inner = np.maximum(inner, outer * attached)
        gap = outer * (1 - inner)
        sub = air[sl]
        sub *= inner * _F32(1 - 0.3 * c) + (1 - inner)
        sub += gap * (_F32(1.12) - sub)
        markings = markings.copy()
        markings[sl] *= 1 - gap
        ptx_line = (sl, 4 * inner * (1 - inner) * outer)
    return markings, ptx_line


def _frontal_mediastinum(sc: _Scene, a: _Frontal, trunk: np.ndarray) -> None:
    """Hila, heart density, trachea and main bronchi, gastric bubble."""
    for hu, hv, _ in _HILA:
        sl, pu, pv = sc.patch(hu - 0.16, hu + 0.16, hv - 0.24, hv + 0.24)
        sc.density[sl] += _F32(0.1) * _gauss2(pu - _F32(hu), pv - _F32(hv), 0.05, 0.075)
    hu, hv, ha, hb, tilt = a.heart
    sl, pu, pv = sc.patch(hu - 0.8 * ha, hu + 1.2 * ha, hv - 1.3 * hb, hv + 1.3 * hb)
    sc.density[sl] += _F32(0.06) * _heart(pu, pv, hu, hv, ha, hb, tilt)
    sl, pu, pv = sc.patch(-0.25, 0.25, -1.2, -0.1)
    x = pu - _F32(a.spine_u * 0.5)
    y = pv + _F32(0.33)
    trach = _ramp(_F32(0.032) - np.abs(x), 0.015) * _ramp(-y, 0.04)
    for s in (-1.0, 1.0):  # main bronchi leave the carina at about 37 degrees from vertical
        along = x * _F32(s * 0.6) + y * _F32(0.8)
        across = np.abs(x * _F32(s * 0.8) - y * _F32(0.6))
        trach = np.maximum(
            trach, _ramp(_F32(0.022) - across, 0.012) * _ramp(along, 0.02) * _ramp(_F32(0.16) - along, 0.03)
        )
    sc.density[sl] -= _F32(0.2) * trach * trunk[sl]
    if a.bubble is not None:
        bu, size = a.bubble
        bv = a.left.dome_v + 0.09
        sl, pu, pv = sc.patch(bu - size - 0.03, bu + size + 0.03, bv - size, bv + 0.03)
        ell = 1 - ((pu - _F32(bu)) * _F32(1 / size)) ** 2 - ((pv - _F32(bv)) * _F32(1 / (0.6 * size))) ** 2
        sc.density[sl] -= _F32(0.3) * _ramp(ell, 0.25) * _ramp(_F32(bv + 0.01) - pv, 0.01)  # air-fluid level


def _frontal_bones(sc: _Scene, a: _Frontal) -> None:
    """Posterior and anterior ribs, clavicles, humeral heads, scapulae, thoracic spine."""
    lung, lat = a.right, a.lat
    # Posterior ribs: arches rising slightly from the spine, then sweeping down along the lateral chest wall.
    sl, pu, pv = sc.patch(-lat - 0.12, lat + 0.12, lung.apex_v - 0.1, lung.base_v + 0.18)
    r = np.abs(pu)
    rn = r * _F32(1.0 / lat)
    c0 = lung.apex_v - 0.05 + a.rib_phase
    bend = np.maximum(rn - _F32(0.8), 0.0)
    cpost = pv - _F32(0.85) * (rn - _F32(0.3)) ** 2 - _F32(1.2) * bend * bend - _F32(c0)
    phase = np.maximum(cpost, 0.0) * _F32(1.0 / a.rib_space)
    phase *= 1.0 - _F32(0.045) * phase  # ribs spread out lower down
    wall = _F32(lat + 0.05) - _F32(0.12) * _ramp(_F32(lung.apex_v + 0.25) - pv, 0.3) * (_F32(0.5) - cpost)
    extent = _ramp(r - _F32(0.06), 0.03) * _ramp(wall - r, 0.06) * _ramp(cpost + _F32(0.02), 0.04)
    extent *= _ramp(_F32(8.6) - phase, 0.5) * _ramp(_F32(lung.base_v + 0.1) - pv, 0.12)
    # Ribs are centred on integer phases; each gets its own small shift and density (the jump between two
    # ribs' values falls mid-way in the intercostal space, where the rib profile is zero).
    k = np.minimum((phase + _F32(0.5)).astype(np.intp), 11)
    band = np.cos((phase + a.rib_jitter[:, 0].take(k)) * _F32(2 * math.pi))
    ribs = _F32(0.07) * _ramp(band - _F32(0.1), 0.55)
    ribs += _F32(0.05) * _ramp(_F32(0.35) - np.abs(band - _F32(0.1)), 0.3)
    ribs *= a.rib_jitter[:, 1].take(k)
    # Anterior ribs: fainter, wider spaced, running down and medially from the lateral wall.
    cant = pv + _F32(0.5) * rn - _F32(0.1) * rn * rn - _F32(lung.apex_v + 0.2)
    pa = np.maximum(cant, 0.0) * _F32(1.0 / (a.rib_space * 1.35))
    ant = (
        _ramp(np.cos(pa * _F32(2 * math.pi)) - _F32(0.35), 0.5)
        * _ramp(rn - _F32(0.4), 0.25)
        * _ramp(wall - r, 0.06)
    )
    ant *= _ramp(cant, 0.05) * _ramp(_F32(5.2) - pa, 0.5)
    sc.density[sl] += ribs * extent + _F32(0.05) * ant
    # Clavicles: S-shaped bars from the sternal notch up to the acromion.
    sl, pu, pv = sc.patch(-0.75, 0.75, a.clav_v - 0.25, a.clav_v + 0.1)
    r = np.abs(pu)
    cl = _F32(a.clav_v) - _F32(0.28) * r + _F32(0.14) * r * r + _F32(0.02) * np.sin(r * _F32(math.pi / 0.3))
    half = _F32(0.026) + _F32(0.012) * _ramp(_F32(0.15) - r, 0.2)
    dist = np.abs(pv - cl)
    clav = _ramp(half - dist, 0.012) * _ramp(r - _F32(0.045), 0.02) * _ramp(_F32(0.66 * lat / 0.78) - r, 0.04)
    sc.density[sl] += clav * (_F32(0.15) + _F32(0.07) * _ramp(dist - half * _F32(0.5), 0.01))
    # Humeral heads (and shafts) at the upper corners.
    hr, hv = a.skin + 0.02, a.shoulder_v + 0.2
    for side in (-1.0, 1.0):
        sl, pu, pv = sc.patch(*sorted((side * (hr - 0.14), side * (hr + 0.14))), hv - 0.14, hv + 0.6)
        r = pu * _F32(side)
        hum = _ramp(_F32(0.12) - np.hypot(r - _F32(hr), pv - _F32(hv)), 0.02)
        hum += _ramp(_F32(0.05) - np.abs(r - _F32(hr + 0.04)), 0.02) * _ramp(pv - _F32(hv), 0.02)
        sc.density[sl] += _F32(0.18) * np.minimum(hum, 1.0)
    # Scapulae overlap the upper lateral lungs unless rotated out (PA films).
    sl, pu, pv = sc.patch(-lat - 0.1, lat + 0.1, a.shoulder_v, 0.0)
    r = np.abs(pu)
    sline = _F32(lat * 0.94) - _F32(0.25) * np.maximum(pv - _F32(a.shoulder_v), 0.0)
    scap = _ramp(r - sline, 0.03) * _ramp(_F32(lat + 0.08) - r, 0.05)
    scap *= _ramp(pv - _F32(a.shoulder_v + 0.05), 0.05) * _ramp(_F32(-0.05) - pv, 0.1)
    sc.density[sl] += _F32(a.scapula) * scap
    # Spine: a column of vertebral bodies with pedicles and spinous processes.
    sl, pu, pv = sc.patch(a.spine_u - 0.11, a.spine_u + 0.11, -1.2, 1.2)
    us = pu - _F32(a.spine_u)
    ph = (pv * _F32(1 / 0.094) + _F32(a.spine_phase)) % 1.0
    aus = np.abs(us)
    bodies = _ramp(_F32(0.062) - aus, 0.035) * (
        _F32(0.75) + _F32(0.25) * _ramp(np.abs(ph - _F32(0.5)) - _F32(0.12), 0.1)
    )
    ped = _ramp(1 - ((aus - _F32(0.045)) * _F32(1 / 0.012)) ** 2 - ((ph - _F32(0.4)) * _F32(5)) ** 2, 0.4)
    spinous = _ramp(1 - (us * _F32(100)) ** 2 - ((ph - _F32(0.75)) * _F32(1 / 0.22)) ** 2, 0.4)
    sc.density[sl] += _F32(0.08) * bodies + _F32(0.06) * ped + _F32(0.04) * spinous


def _frontal_devices(sc: _Scene, a: _Frontal) -> None:
    """Support devices (findings) and ECG electrodes with leads (nuisance, mostly on portable films)."""
    sev = sc.sev
    gn = sc.stream("leads")
    n_ecg = int(gn.integers(0, 5)) if sc.view == "AP" and gn.uniform() < 0.6 else 0
    ecg = [(gn.uniform(-0.8, 0.8), gn.uniform(-0.75, 0.8), gn.uniform(0, 2 * math.pi)) for _ in range(4)]
    for eu, ev, ang in ecg[:n_ecg]:
        sl, pu, pv = sc.patch(eu - 0.05, eu + 0.05, ev - 0.05, ev + 0.05)
        ring = np.abs(np.hypot(pu - _F32(eu), pv - _F32(ev)) - _F32(0.028))
        sc.density[sl] += _F32(0.35) * _ramp(_F32(0.006) - ring, 0.008)
        end = (eu + 0.9 * math.cos(ang), ev + 0.9 * math.sin(ang))
        mid = (0.5 * (eu + end[0]) + gn.normal(0, 0.15), 0.5 * (ev + end[1]) + gn.normal(0, 0.15))
        sc.splat(np.array([(eu, ev), mid, end]), 0.45, 0.008)
    hu, hv, ha, _, _ = a.heart
    if sev["ett"] > 0:  # tube in the trachea, tip a few centimetres above the carina
        g = sc.stream("ett")
        tip = -0.46 + 0.06 * float(g.standard_normal())
        off = a.spine_u * 0.5 + 0.01 * float(g.standard_normal())
        pts = np.array([(off + 0.03, -1.15), (off + 0.01, -0.8), (off, tip)])
        sc.splat(pts + np.array([0.018, 0.0]), 0.18, 0.01)  # tube walls
        sc.splat(pts - np.array([0.018, 0.0]), 0.18, 0.01)
        sc.splat(pts + np.array([0.008, 0.0]), 0.55, 0.012)  # radio-opaque stripe
    if sev["central_line"] > 0:  # catheter from the neck or a subclavian vein to the SVC
        g = sc.stream("central_line")
        tip_v = -0.22 + 0.05 * float(g.standard_normal())
        if g.uniform() < 0.55:  # right internal jugular
            pts = [(-0.20, -1.15), (-0.16, -0.78), (-0.09, -0.55), (-0.07, -0.4), (-0.06, tip_v)]
        else:  # subclavian, right or left
            s = -1.0 if g.uniform() < 0.6 else 1.0
            cv = a.clav_v
            pts = [
                (s * 0.62, cv + 0.02),
                (s * 0.35, cv + 0.07),
                (s * 0.12, cv + 0.14),
                (-0.07, cv + 0.26),
                (-0.06, tip_v),
            ]
        sc.splat(np.array(pts), 0.5, 0.009)
    if sev["pacemaker"] > 0:  # generator below the left clavicle, leads to the right atrium and ventricle
        g = sc.stream("pacemaker")
        bu, bv = 0.45 + 0.05 * float(g.standard_normal()), a.clav_v + 0.17 + 0.03 * float(g.standard_normal())
        ang = float(g.normal(0.2, 0.2))
        ca, sa = math.cos(ang), math.sin(ang)
        sl, pu, pv = sc.patch(bu - 0.13, bu + 0.13, bv - 0.13, bv + 0.13)
        du, dv = pu - _F32(bu), pv - _F32(bv)
        x = (du * _F32(ca) + dv * _F32(sa)) * _F32(1 / 0.085)
        y = (dv * _F32(ca) - du * _F32(sa)) * _F32(1 / 0.065)
        can = _ramp(1.0 - x**4 - y**4, 0.25)
        header = _ramp(1.0 - ((x + _F32(0.55)) * _F32(2.2)) ** 4 - ((y + _F32(1.15)) * _F32(3.5)) ** 4, 0.3)
        sc.density[sl] += can + _F32(0.5) * header
        start = (bu - 0.07, bv - 0.06)
        common = [start, (bu - 0.25, a.clav_v + 0.1), (-0.04, a.clav_v + 0.22), (-0.08, -0.15)]
        sc.splat(np.array([*common, (-0.1, hv - 0.28), (-0.12, hv - 0.2)]), 0.6, 0.008)
        sc.splat(
            np.array([*common, (-0.05, hv - 0.1), (0.05, hv + 0.06), (hu + ha * 0.45, hv + 0.12)]), 0.6, 0.008
        )
    sc.flush_lines()


# ------------------------------------------------------------------------------------------------ lateral


def _draw_lateral(sc: _Scene) -> None:
    """Side profile, patient facing image left: sternum on the left, spine on the right, both lungs
    superimposed; the heart sits anterior-inferior and the posterior costophrenic sulci are the lowest."""
    g = sc.stream("anatomy")
    sev, u, v, res = sc.sev, sc.u, sc.v, sc.res
    body = sev["body_size"]
    edge = max(2.2 / res, 0.012)

    def n() -> float:
        return float(np.clip(g.standard_normal(), -2.0, 2.0))

    grow = 0.94 + 0.12 * body
    front_wall, back_wall = -0.72 * grow + 0.02 * n(), 0.74 * grow + 0.02 * n()
    skin = 0.08 + 0.12 * body
    apex = -0.8 + 0.03 * n()
    dome = 0.2 + 0.04 * n()
    sulcus = dome + 0.42 + 0.03 * n()
    heart_u0 = -0.4 + 0.02 * n()
    spine_phase = float(g.uniform(0, 1))
    rib_phase = float(g.uniform(0, 1))
    arm_tilt = 0.12 * n()
    bubble = bool(g.uniform() < 0.5)

    # ---- soft tissue: neck at the top, chest, raised arms overlapping the apices
    top = np.clip((_F32(-0.5) - v) * _F32(2.0), 0.0, 1.0)
    top = top * np.sqrt(top)
    front = _F32(front_wall - skin) + _F32(0.2) * top
    back = _F32(back_wall + skin * 0.7) - _F32(0.08) * top
    trunk = _ramp(u - front, 0.04) * _ramp(back - u, 0.04)
    mid, half = (front + back) * _F32(0.5), (back - front) * _F32(0.5)
    thick = np.sqrt(np.clip(1 - ((u - mid) / half) ** 2, 0.0, 1.0))
    sc.density += trunk * (_F32(0.75) + _F32(0.45) * thick + _F32(0.22) * _ramp(_F32(-0.42) - v, 0.3))
    sl, pu, pv = sc.patch(-0.6, 0.45, -1.2, -0.3)
    humeri = np.zeros_like(pu)
    for du in (0.0, 0.07):
        ang = 1.25 + arm_tilt
        ca, sa = math.cos(ang), math.sin(ang)
        x, y = pu - _F32(0.1 + du), pv + _F32(0.5)
        along = x * _F32(ca) + y * _F32(sa)
        across = y * _F32(ca) - x * _F32(sa)
        sc.density[sl] += (
            _F32(0.1) * _ramp(_F32(0.12) - np.abs(across), 0.06) * _ramp(-along - _F32(0.05), 0.1)
        )
        humeri += _ramp(_F32(0.035) - np.abs(across), 0.015) * _ramp(-along - _F32(0.1), 0.05)
    sc.density[sl] += _F32(0.12) * np.minimum(humeri, 1.0)

    # ---- lungs (both superimposed): a rounded outline cut by the two hemidiaphragms
    cu, au = 0.5 * (front_wall + back_wall) + 0.01, 0.5 * (back_wall - front_wall) + 0.01
    cv, av = sulcus - 0.05, sulcus + 0.05 - apex
    ax = np.abs((u - _F32(cu)) * _F32(1 / au))
    ay = np.abs(np.minimum(v - _F32(cv), 0.0) * _F32(1 / av))
    outline = 1.0 - ax * ax * np.sqrt(ax) - ay * ay  # a superellipse, squarer at the sides
    d = u + _F32(0.2)
    dia = _F32(dome) + np.where(d > 0, _F32((sulcus - dome) / (back_wall + 0.2) ** 2), _F32(0.35)) * d * d
    t = np.clip((v - _F32(apex)) * _F32(1 / (sulcus - apex)), 0.0, 1.0)
    # Two hemidiaphragms (the left a little lower); the apices fade into the superimposed shoulders.
    below = _F32(0.5) * (_ramp(dia - v, edge) + _ramp(dia + _F32(0.045) - v, edge))
    soft_top = _F32(3 * edge) + _F32(0.12) * _ramp(_F32(-0.45) - v, 0.2)
    air = np.clip(outline / soft_top + _F32(0.5), 0.0, 1.0) * below
    air *= _F32(0.75) + _F32(0.25) * _ramp(t - _F32(0.2), 0.3)
    lung = air > 0

    cm = sev["cardiomegaly"]
    ha, hb = 0.4 * (1 + 0.4 * cm), 0.5 * (1 + 0.1 * cm)
    hu, hv = heart_u0 + 0.14 * cm, dome + 0.14
    heart = _ramp(1 - ((u - _F32(hu)) * _F32(1 / ha)) ** 2 - ((v - _F32(hv)) * _F32(1 / hb)) ** 2, 0.25)
    vessels = (
        _ramp(_F32(0.09) - np.abs(u + _F32(0.1)), 0.06)
        * _ramp(v + _F32(0.48), 0.1)
        * _ramp(_F32(hv - hb * 0.5) - v, 0.15)
    )
    air *= 1 - _F32(0.88) * np.maximum(heart, _F32(0.3) * vessels)

    markings = _lung_markings(sc, ((0.0, -0.08, 1.0), (0.06, -0.05, -1.0)))
    mottle = _smooth_noise(sc.stream("texture"), res, 14) if sev["edema"] > 0 else None
    for name, (cu0, cv0) in (("right", (0.12, 0.22)), ("left", (0.4, 0.32))):
        s_c = sev[f"consolidation_{name}"]
        if s_c > 0:
            gc = sc.stream(f"consolidation_{name}")
            patch = _smooth_noise(gc, res, 10)
            cu2, cv2 = cu0 + float(gc.uniform(-0.06, 0.06)), cv0 + float(gc.uniform(-0.06, 0.06))
            region = _gauss2(u - _F32(cu2), v - _F32(cv2), 0.15 + 0.12 * s_c, 0.13 + 0.12 * s_c)
            air *= 1 - np.clip(region * (_F32(1.1) + _F32(0.45) * patch) * _F32(s_c**0.7), 0.0, 0.9)
        s_e = sev[f"effusion_{name}"]
        if s_e > 0:  # fluid fills the posterior costophrenic sulcus first, with a meniscus
            level = sulcus + (0.03 if name == "left" else 0.0) - (0.02 + 0.5 * s_e) * (sulcus - apex)
            x = np.clip((u + _F32(0.2)) * _F32(1 / (back_wall + 0.2)), 0.0, 1.1)
            men = _F32(0.12 + 0.2 * s_e) * x * np.sqrt(x)
            fluid = _ramp(v - _F32(level + 0.25) + men, 0.06 + 0.04 * s_e) * _ramp(u + _F32(0.25), 0.15)
            air *= 1 - _F32(0.55 * min(1.0, 10 * s_e)) * fluid
    if sev["edema"] > 0:
        s = sev["edema"]
        assert mottle is not None
        haze = _gauss2(u - _F32(0.06), v + _F32(0.03), 0.3 + 0.1 * s, 0.32 + 0.1 * s) * (
            _F32(0.85) + _F32(0.35) * mottle
        )
        air *= 1 - np.clip(haze * _F32(0.75 * s), 0.0, 0.9)
        markings = markings * _F32(1 + 0.8 * s)
    if sev["atelectasis"] > 0:
        s = sev["atelectasis"]
        ga = sc.stream("atelectasis")
        cu0, cv0, ang = float(ga.uniform(-0.1, 0.35)), float(ga.uniform(0.0, 0.2)), float(ga.normal(0.3, 0.2))
        c, sn = math.cos(ang), math.sin(ang)
        x, y = u - _F32(cu0), v - _F32(cv0)
        al, ac = x * _F32(c) + y * _F32(sn), y * _F32(c) - x * _F32(sn)
        air *= 1 - _F32(0.75) * _ramp(_F32(0.012 + 0.02 * s) - np.abs(ac), 0.02) * _ramp(
            _F32(0.13 + 0.14 * s) - np.abs(al), 0.08
        )
    ptx_line = None
    if sev["pneumothorax"] > 0:
        s = sev["pneumothorax"]
        # Air rises anteriorly and to the apex: the visceral pleural line drops away from both.
        edge_v = _F32(apex + 0.08 + 0.3 * s) - _F32(0.25 * s) * np.clip((u - _F32(0.12)) * _F32(2), -1.0, 0.0)
        inner = _ramp(v - edge_v, 0.012)
        gap = lung * (1 - inner)
        air = air * (1 - gap) + gap * _F32(1.1)
        markings = markings * (1 - gap)
        ptx_line = 4 * inner * (1 - inner) * lung

    sc.density += _F32(0.25) - _F32(0.8) * air + _F32(0.4) * markings * air
    sl, pu, pv = sc.patch(-0.25, 0.33, -0.4, 0.24)
    sc.density[sl] += _F32(0.1) * _gauss2(pu - _F32(0.04), pv + _F32(0.08), 0.08, 0.1)  # hila
    if ptx_line is not None:
        sc.density += _F32(0.15) * ptx_line
    sl, pu, pv = sc.patch(-0.25, 0.25, -1.2, -0.05)
    trach = _ramp(_F32(0.038) - np.abs(pu - _F32(-0.12) - _F32(0.16) * (pv + 1)), 0.02) * _ramp(
        _F32(-0.12) - pv, 0.06
    )
    sc.density[sl] -= _F32(0.22) * trach * trunk[sl]
    if bubble:
        bv = dome + 0.12
        ell = 1 - ((u + _F32(0.05)) * _F32(10)) ** 2 - ((v - _F32(bv)) * _F32(20)) ** 2
        sc.density -= _F32(0.25) * _ramp(ell, 0.3)

    # ---- bones: thoracic spine (bodies, end plates, posterior elements), sternum, posterior ribs
    def spine_u(pv: np.ndarray) -> np.ndarray:
        return _F32(back_wall - 0.1) + _F32(0.04) * (pv + _F32(0.1)) ** 2

    sl, pu, pv = sc.patch(back_wall - 0.25, back_wall + 0.3, -1.2, 1.2)
    us = pu - spine_u(pv)
    ph = (pv * _F32(1 / 0.105) + _F32(spine_phase)) % 1.0
    col = _ramp(_F32(0.085) - np.abs(us), 0.02)
    dph = np.abs(ph - _F32(0.5))
    verts = _F32(0.16) * _ramp(dph - _F32(0.07), 0.05) + _F32(0.08) * _ramp(
        _F32(0.04) - np.abs(dph - _F32(0.09)), 0.03
    )
    verts *= col
    posterior = _ramp(us - _F32(0.1), 0.03) * _ramp(_F32(0.24) - us, 0.05)
    verts += _F32(0.1) * posterior * (_F32(0.55) + _F32(0.45) * np.cos(ph * _F32(2 * math.pi)))
    verts *= (1 - _F32(0.3) * _ramp(pv, 1.2)) * _ramp(pv + _F32(1.1), 0.1)  # lower vertebrae look darker
    sc.density[sl] += verts
    sl, pu, pv = sc.patch(front_wall - 0.08, front_wall + 0.06, -0.7, dome + 0.35)
    manubrium = _ramp(_F32(0.06) - np.abs(pv + _F32(0.52)), 0.04)
    sternum = _ramp(_F32(0.018) + _F32(0.02) * manubrium - np.abs(pu - _F32(front_wall - 0.01)), 0.015)
    sternum *= _ramp(pv + _F32(0.6), 0.05) * _ramp(_F32(dome + 0.25) - pv, 0.05)
    sc.density[sl] += _F32(0.2) * sternum
    sl, pu, pv = sc.patch(-0.1, back_wall + 0.1, apex - 0.1, sulcus + 0.1)
    sp = spine_u(pv)
    rp = ((pv + _F32(0.35) * (pu - sp)) * _F32(1 / 0.12) + _F32(rib_phase)) % 1.0
    ribs = (
        _ramp(_F32(0.12) - np.abs(rp - _F32(0.5)), 0.12) * _ramp(sp - pu, 0.05) * _ramp(pu - _F32(0.05), 0.25)
    )
    ribs *= _ramp(_F32(sulcus) - pv, 0.1) * _ramp(pv - _F32(apex), 0.1)
    sc.density[sl] += _F32(0.05) * ribs

    # ---- devices
    if sev["ett"] > 0:
        tip = -0.42 + 0.06 * float(sc.stream("ett").standard_normal())
        ys = np.linspace(-1.15, tip, 5)
        pts = np.column_stack([-0.12 + 0.16 * (ys + 1), ys])
        sc.splat(pts + np.array([0.015, 0.0]), 0.2, 0.01)
        sc.splat(pts - np.array([0.015, 0.0]), 0.2, 0.01)
        sc.splat(pts, 0.5, 0.012)
    if sev["central_line"] > 0:
        tip_v = -0.22 + 0.05 * float(sc.stream("central_line").standard_normal())
        sc.splat(np.array([(0.05, -1.15), (-0.02, -0.75), (-0.1, -0.45), (-0.14, tip_v)]), 0.5, 0.009)
    if sev["pacemaker"] > 0:
        bu, bv = front_wall - skin * 0.5, -0.5 + 0.04 * float(sc.stream("pacemaker").standard_normal())
        can = _ramp(
            1 - ((u - _F32(bu)) * _F32(1 / 0.03)) ** 4 - ((v - _F32(bv)) * _F32(1 / 0.075)) ** 4, 0.25
        )
        sc.density += can
        path = [(bu + 0.02, bv), (-0.25, -0.62), (-0.12, -0.35), (-0.14, hv - 0.15), (hu - 0.12, hv + 0.12)]
        sc.splat(np.array(path), 0.8, 0.012)
    sc.flush_lines()


# ------------------------------------------------------------------------------------------------ develop


def _develop(sc: _Scene, size: int) -> np.ndarray:
    """Film response, magnification to the output size, quantum noise, display gamma -> uint8."""
    g = sc.stream("develop")
    body, expo = sc.sev["body_size"], sc.sev["exposure"]
    ap, lateral = sc.view == "AP", sc.view == "LATERAL"
    # More exposure darkens the film; a bigger patient scatters more (fog) and flattens contrast.
    centre = 0.60 + 0.34 * (expo - 0.5) + 0.03 * float(g.standard_normal()) + (0.3 if lateral else 0.0)
    slope = 0.27 * (1 + 0.35 * body) * float(g.uniform(0.9, 1.12)) * (1.08 if ap else 1.0)
    fog = 0.1 * body + (0.05 if ap else 0.0)
    sigma = (0.01 + 0.008 * body + (0.008 if ap else 0.0)) * float(g.uniform(0.8, 1.25))
    gamma = float(g.uniform(0.85, 1.2))
    res = sc.res
    oy, ox, orient = (
        int(g.integers(0, _NOISE_TILE - res + 1)),
        int(g.integers(0, _NOISE_TILE - res + 1)),
        int(g.integers(8)),
    )

    x = sc.density - _F32(centre - fog)
    x *= _F32(-1.0 / slope)
    np.exp(x, out=x)
    x += 1
    img = np.reciprocal(x, out=x) ** _F32(gamma)  # characteristic curve, then display gamma
    noise = np.rot90(_noise_tile()[oy : oy + res, ox : ox + res], orient % 4)
    if orient >= 4:
        noise = noise[::-1]
    # Quantum noise is larger where fewer photons reach the detector (bright regions): sd = s (0.6 + 0.8 I).
    # It is added at the internal resolution: magnified with the image, it has the grain of a detector
    # whose sharpness matches the anatomy's.
    out = noise * _F32(sigma * 0.8 * 255.0)
    out += 255.0
    out *= img
    out += noise * _F32(sigma * 0.6 * 255.0)
    out += 0.5
    np.clip(out, 0, 255, out=out)
    u8 = out.astype(np.uint8)
    if size != res:
        u8 = np.asarray(Image.fromarray(u8, mode="L").resize((size, size), Image.BILINEAR))
    return u8
