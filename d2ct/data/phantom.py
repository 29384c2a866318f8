"""Procedural abdominal CT phantom: d2ct's embedded default data (no download needed).

Each slice is drawn from analytic shapes in a "body frame" (unit = half the body width, X towards
the patient's left = image right, Y towards posterior = image down), on a pixel grid that is
rotated, shifted and elastically deformed, so every slice has its own anatomy. The anatomy follows a
craniocaudal ``level`` in [0, 1] (0 = lung bases / dome of the liver around T11, 1 = lower lumbar /
iliac crests), so organs appear and disappear as in a real scan: lung bases and ribs at the top,
liver, spleen and stomach in the upper half, kidneys, pancreas and gallbladder in the middle,
psoas, bowel and iliac vessels / iliac wings at the bottom. Tissues carry typical HU values;
partial-volume blur, correlated noise and a slight cupping are added, then the slice is windowed
(level 40 / width 400) to uint8 as the challenge images are.

Labels: every visible structure is one instance (bowel loops and colon segments are one multi-part
instance each); the labelled ones are numbered with a random permutation of 1..K; some structures
stay unlabelled (0) at random, as in real partial annotations. Fat, skin, the abdominal wall ring,
small vessels and the couch are never labelled.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from d2ct.data.volumes import atomic_directory, window
from d2ct.errors import ConfigError, DataError
from d2ct.utils.fileio import atomic_write, atomic_write_json, read_json

#: Bump when the drawing changes, so that existing phantom folders are regenerated.
PHANTOM_VERSION = 1
PARAMS_FILE = "phantom.json"


@dataclass(frozen=True)
class PhantomConfig:
    """Knobs of the phantom generator; the defaults give 256-px abdominal slices like the challenge's."""

    body_width: tuple[float, float] = (0.62, 0.86)  # body width / image width
    body_aspect: tuple[float, float] = (0.66, 0.82)  # antero-posterior / lateral body diameter
    habitus: tuple[float, float] = (0.88, 1.18)  # > 1: more fat, relatively smaller organs
    max_rotation_deg: float = 5.0
    max_shift: float = 0.04  # body centre offset, fraction of the image size
    elastic_amplitude: float = 0.03  # body units
    elastic_grid: int = 5  # control points per side of the smooth random displacement field
    blur_sigma: tuple[float, float] = (0.5, 0.85)  # pixels at 256 px: partial-volume blur
    noise_std: tuple[float, float] = (10.0, 20.0)  # HU
    noise_corr: float = 0.7  # pixels: correlation length of the noise
    cupping: tuple[float, float] = (0.0, 8.0)  # HU lost in the body centre (beam hardening)
    p_enhanced: float = 0.6  # probability of a contrast-enhanced (portal venous) slice
    p_oral_contrast: float = 0.15
    p_couch: float = 0.7
    p_disc: float = 0.12  # slice through an intervertebral disc instead of a vertebral body
    lesion_rate: float = 0.9  # expected lesions per slice (liver, spleen, kidneys)
    min_structures: int = 5
    max_structures: int = 25
    min_area: int = 12  # pixels at 256 px (scaled with the image area)

    def validate(self) -> None:
        if not 1 <= self.min_structures <= self.max_structures <= 255:
            raise ConfigError(
                f"PhantomConfig: need 1 <= min_structures <= max_structures <= 255, got "
                f"{self.min_structures}, {self.max_structures}")
        for name in ("body_width", "body_aspect", "habitus", "blur_sigma", "noise_std", "cupping"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(f"PhantomConfig.{name} must be a (low, high) range with 0 <= low <= high, got {(lo, hi)}")


# --------------------------------------------------------------------------------------------- canvas
class _Canvas:
    """The slice being drawn: deformed body-frame coordinates, HU image and structure ownership."""

    def __init__(self, rng: np.random.Generator, size: int, cfg: PhantomConfig):
        self.rng = rng
        self.size = size
        self.unit = size * rng.uniform(*cfg.body_width) / 2.0  # pixels per body unit
        self.cx = size / 2.0 + rng.uniform(-1, 1) * cfg.max_shift * size
        self.cy = size / 2.0 + rng.uniform(-1, 1) * cfg.max_shift * size
        self.theta = math.radians(rng.uniform(-1, 1) * cfg.max_rotation_deg)
        c, s = math.cos(self.theta), math.sin(self.theta)
        pix = (np.arange(size, dtype=np.float32) + 0.5)
        px = (pix[None, :] - self.cx) / self.unit
        py = (pix[:, None] - self.cy) / self.unit
        g = max(2, int(cfg.elastic_grid))
        coarse = rng.normal(0.0, cfg.elastic_amplitude, size=(2, g, g))
        dx = ndimage.zoom(coarse[0], size / g, order=3, mode="nearest", grid_mode=True)
        dy = ndimage.zoom(coarse[1], size / g, order=3, mode="nearest", grid_mode=True)
        self.X = (c * px - s * py + dx).astype(np.float32)
        self.Y = (s * px + c * py + dy).astype(np.float32)
        self.dmax = float(max(np.abs(dx).max(), np.abs(dy).max()))
        self.hu = np.full((size, size), -1000.0, dtype=np.float32)
        self.owner = np.zeros((size, size), dtype=np.int16)  # 0 = unlabelled tissue, k = structures[k-1]
        self.names: list[str] = []

    # -- geometry
    def _bbox(self, cx: float, cy: float, radius: float) -> tuple[slice, slice] | None:
        c, s = math.cos(self.theta), math.sin(self.theta)
        pcx = self.cx + self.unit * (c * cx + s * cy)
        pcy = self.cy + self.unit * (-s * cx + c * cy)
        half = (radius + self.dmax) * self.unit + 2.0
        r0, r1 = max(0, int(pcy - half)), min(self.size, int(math.ceil(pcy + half)) + 1)
        c0, c1 = max(0, int(pcx - half)), min(self.size, int(math.ceil(pcx + half)) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def harmonics(self, amp: float, kmax: int = 4) -> list[tuple[int, float, float]]:
        """Random radial Fourier perturbation: amplitude ``amp / k`` for the k-th harmonic."""
        return [(k, float(self.rng.normal(0, amp / k)), float(self.rng.uniform(0, 2 * math.pi)))
                for k in range(2, kmax + 1)] if amp > 0 else []

    def blob(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
             harm: list | None = None, post_exp: float = 2.0) -> np.ndarray:
        """Full-size mask of a (perturbed) ellipse; ``post_exp`` > 2 flattens its posterior side."""
        out = np.zeros((self.size, self.size), dtype=bool)
        extent = max(rx, ry) * (1.0 + sum(abs(a) for _, a, _ in (harm or [])))
        sl = self._bbox(cx, cy, extent)
        if sl is None or rx <= 0 or ry <= 0:
            return out
        x = self.X[sl] - cx
        y = self.Y[sl] - cy
        ca, sa = math.cos(angle), math.sin(angle)
        u = (ca * x + sa * y) / rx
        v = (-sa * x + ca * y) / ry
        if post_exp != 2.0:
            av = np.abs(v)
            rho2 = u * u + np.where(v > 0, av ** post_exp, av * av)
        else:
            rho2 = u * u + v * v
        if harm:
            phi = np.arctan2(v, u)
            r = np.ones_like(phi)
            for k, a, p in harm:
                r += a * np.cos(k * phi + p)
            out[sl] = rho2 < r * r
        else:
            out[sl] = rho2 < 1.0
        return out

    def capsule(self, points: list[tuple[float, float]], radii: list[float]) -> np.ndarray:
        """Union of disks along a polyline, radii interpolated (tubes: pancreas, bowel, iliac wings)."""
        out = np.zeros((self.size, self.size), dtype=bool)
        pts = np.asarray(points, dtype=float)
        rad = np.asarray(radii, dtype=float)
        steps = []
        for i in range(len(pts) - 1):
            seg = np.linalg.norm(pts[i + 1] - pts[i])
            n = max(2, int(seg / max(1e-3, 0.5 * min(rad[i], rad[i + 1]))) + 1)
            t = np.linspace(0, 1, n, endpoint=(i == len(pts) - 2))
            steps.append(np.column_stack([pts[i] + t[:, None] * (pts[i + 1] - pts[i]), rad[i] + t * (rad[i + 1] - rad[i])]))
        for x, y, r in np.concatenate(steps):
            out |= self.blob(x, y, r, r)
        return out

    def erode(self, mask: np.ndarray, px: float) -> np.ndarray:
        n = max(1, int(round(px)))
        return ndimage.binary_erosion(mask, iterations=n)

    def px(self, body_units: float) -> float:
        return body_units * self.unit

    def bu(self, pixels: float) -> float:
        return pixels / self.unit

    # -- painting
    def add(self, name: str) -> int:
        self.names.append(name)
        return len(self.names)

    def paint(self, mask: np.ndarray, hu: float | np.ndarray, owner: int | None = 0) -> None:
        """Set HU (and the owning structure, unless ``owner`` is None) where ``mask``."""
        if isinstance(hu, np.ndarray):
            self.hu[mask] = hu[mask]
        else:
            self.hu[mask] = hu
        if owner is not None:
            self.owner[mask] = owner

    def structure(self, name: str, mask: np.ndarray, hu: float | np.ndarray) -> int:
        sid = self.add(name)
        self.paint(mask, hu, sid)
        return sid

    def sample_in(self, mask: np.ndarray, n: int) -> list[tuple[float, float]]:
        """Body-frame positions of ``n`` random pixels of ``mask`` (empty list if none)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return []
        pick = self.rng.choice(idx, size=n, replace=idx.size < n)
        return [(float(self.X.flat[i]), float(self.Y.flat[i])) for i in pick]


def _bump(level: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], rising to 1 in the middle (organ cross-section size along z)."""
    if level <= lo or level >= hi:
        return 0.0
    return math.sin(math.pi * (level - lo) / (hi - lo)) ** 0.7


def _ramp(level: float, lo: float, hi: float) -> float:
    """0 below lo, 1 above hi (hi < lo gives a falling ramp)."""
    t = (level - lo) / (hi - lo)
    return float(min(1.0, max(0.0, t)))


_VERTEBRA_NAMES = [(0.10, "T11"), (0.22, "T12"), (0.36, "L1"), (0.50, "L2"), (0.64, "L3"), (0.78, "L4"), (0.90, "L5"), (1.01, "S1")]


# ------------------------------------------------------------------------------------------- anatomy
def _draw_anatomy(cv: _Canvas, level: float, cfg: PhantomConfig) -> dict:
    rng = cv.rng
    U = rng.uniform
    enhanced = bool(rng.random() < cfg.p_enhanced)
    hab = U(*cfg.habitus)
    h = U(*cfg.body_aspect) * (1.0 - 0.08 * _ramp(level, 0.3, 1.0))  # lower abdomen a bit flatter
    t_fat = U(0.04, 0.09) * hab ** 3 + 0.02  # subcutaneous fat (body units)
    t_mus = U(0.035, 0.06) / hab
    body_harm = cv.harmonics(0.025, 4)
    post_exp = U(2.3, 3.2)

    def body(scale_off: float) -> np.ndarray:
        return cv.blob(0.0, 0.0, 1.0 - scale_off, h - scale_off, harm=body_harm, post_exp=post_exp)

    # Tissue layers (never labelled): skin, subcutaneous fat, muscle wall, visceral fat.
    outer = body(0.0)
    cv.paint(outer, U(20, 40))
    cv.paint(body(cv.bu(1.2)), U(-115, -90))  # subcutaneous fat
    wall = body(t_fat)
    cv.paint(wall, U(40, 55))  # abdominal wall muscles (obliques, transversus), unlabelled ring
    cavity = body(t_fat + t_mus)
    fat_hu = U(-100, -80)
    cv.paint(cavity, fat_hu)

    # Spine geometry (needed by most organs).
    rv = U(0.10, 0.125) / hab
    yv = h * U(0.22, 0.32)
    y_front = yv - rv * 0.85  # anterior edge of the vertebral body

    # Paraspinal muscles, quadratus lumborum, psoas, rectus abdominis.
    musc = lambda: U(45, 58)  # noqa: E731
    wall_in = body(t_fat)
    for side, name in ((-1, "right"), (1, "left")):
        m = cv.blob(side * (0.08 + rv * 0.8), yv + rv + 0.15, U(0.14, 0.19) / hab ** 0.5, U(0.15, 0.2) / hab ** 0.5,
                    angle=side * U(0.0, 0.3), harm=cv.harmonics(0.05)) & wall_in
        cv.structure(f"autochthon_{name}", m, musc())
        q = cv.blob(side * (rv + 0.18), yv + rv * 0.6, 0.07 / hab, 0.05 / hab, angle=side * 0.6) & wall_in
        cv.paint(q, musc())
    s_ps = _ramp(level, 0.3, 0.85)
    if s_ps > 0:
        for side, name in ((-1, "right"), (1, "left")):
            r = (0.03 + 0.07 * s_ps) / hab
            m = cv.blob(side * (rv + r * 0.7), yv - 0.01 + 0.02 * s_ps, r * U(0.85, 1.0), r * U(1.0, 1.25),
                        angle=side * 0.4, harm=cv.harmonics(0.04)) & cavity
            cv.structure(f"psoas_{name}", m, musc())
    rect_y = -(h - t_fat - U(0.02, 0.035))
    for side, name in ((-1, "right"), (1, "left")):
        gap = U(0.012, 0.03)
        rx = U(0.09, 0.13)
        m = cv.blob(side * (gap + rx), rect_y, rx, U(0.025, 0.04), angle=-side * 0.12) & wall_in
        cv.structure(f"rectus_abdominis_{name}", m, musc())

    organs: dict[str, int] = {}
    info = {"phase": "enhanced" if enhanced else "unenhanced", "habitus": hab}

    # Liver: large at the top, right lobe tip by mid-abdomen.
    s_liv = _ramp(level, 0.66, 0.0)
    if s_liv > 0:
        liv_hu = U(80, 105) if enhanced else U(52, 66)
        cx, cy = -0.45 + 0.1 * (1 - s_liv), 0.0 + 0.12 * (1 - s_liv)
        m = cv.blob(cx, cy, (0.18 + 0.38 * s_liv) / hab ** 0.5, (0.16 + 0.42 * s_liv) * h / 0.75 / hab ** 0.5,
                    angle=U(-0.3, 0.3), harm=cv.harmonics(0.08))
        if level < 0.35:  # left lobe across the midline, anterior
            s_ll = _ramp(level, 0.35, 0.05)
            m |= cv.blob(0.05 + 0.1 * s_ll, -h * 0.42, (0.12 + 0.2 * s_ll), (0.06 + 0.1 * s_ll), angle=U(-0.2, 0.3),
                         harm=cv.harmonics(0.06))
        m &= cavity
        organs["liver"] = cv.structure("liver", m, liv_hu)
        # intrahepatic vessels: darker unenhanced, brighter enhanced; part of the liver label
        vess = np.zeros_like(m)
        for x, y in cv.sample_in(cv.erode(m, 3), int(U(3, 10))):
            r = U(0.012, 0.03)
            vess |= cv.blob(x, y, r, r * U(0.6, 1.0), angle=U(0, math.pi))
        cv.paint(vess & m, liv_hu + (U(40, 80) if enhanced else U(-25, -12)), owner=None)

    s_gb = _bump(level, 0.25, 0.58)
    if s_gb > 0.2 and "liver" in organs and rng.random() < 0.8:
        m = cv.blob(-0.28 + U(-0.06, 0.06), -h * U(0.25, 0.45), U(0.05, 0.09) * s_gb, U(0.06, 0.11) * s_gb,
                    angle=U(0, math.pi), harm=cv.harmonics(0.04)) & cavity
        organs["gallbladder"] = cv.structure("gallbladder", m, U(0, 20))

    # Spleen: posterolateral left, crescent.
    s_spl = _bump(level, -0.1, 0.45)
    if s_spl > 0.1:
        cx, cy, rx, ry = 0.6, yv * 0.6, (0.08 + 0.08 * s_spl) / hab ** 0.5, (0.14 + 0.14 * s_spl) / hab ** 0.5
        m = cv.blob(cx, cy, rx, ry, angle=U(-0.7, -0.3), harm=cv.harmonics(0.05))
        m &= ~cv.blob(cx - rx * 1.1, cy - 0.02, rx * 0.7, ry * 0.8)  # concave medial (hilar) side
        m &= cavity
        organs["spleen"] = cv.structure("spleen", m, U(105, 125) if enhanced else U(40, 50))

    # Stomach: anterior left, wall + fluid, gas on top (patient supine: anterior is up).
    s_st = _ramp(level, 0.48, 0.1)
    if s_st > 0:
        cx, cy = 0.3 + U(-0.05, 0.08), -h * U(0.3, 0.5)
        rx, ry = (0.12 + 0.14 * s_st) * U(0.8, 1.1), (0.1 + 0.1 * s_st) * U(0.8, 1.1)
        m = cv.blob(cx, cy, rx, ry, angle=U(-0.6, 0.2), harm=cv.harmonics(0.06)) & cavity
        sid = cv.structure("stomach", m, U(50, 80) if enhanced else U(35, 45))
        organs["stomach"] = sid
        lumen = cv.erode(m, max(1.5, cv.px(0.022)))
        cv.paint(lumen, U(0, 25), sid)
        gas = lumen & (cv.Y < cy - ry * U(-0.2, 0.7))
        cv.paint(gas, U(-1000, -950), sid)

    # Pancreas: head right of the vessels down to tail near the spleen.
    s_pa = _bump(level, 0.28, 0.56)
    if s_pa > 0.2:
        yp = y_front - U(0.16, 0.22)
        pts = [(-0.2, yp + 0.04), (-0.05, yp - 0.02), (0.15, yp - 0.01), (0.35, yp + 0.04 * U(-1, 1)), (0.48, yv * 0.5)]
        n = 2 + int(round(3 * s_pa)) if level > 0.42 else 5
        pts = pts[:n] if level > 0.42 else pts
        rad = [U(0.05, 0.075)] + [U(0.035, 0.055) for _ in pts[1:]]
        m = cv.capsule(pts, rad) & cavity & (cv.owner == 0)
        organs["pancreas"] = cv.structure("pancreas", m, U(90, 110) if enhanced else U(35, 48))

    # Kidneys: right slightly lower; cortex, medulla, sinus fat at the medial hilum.
    for side, name, lo, hi in ((-1, "right", 0.28, 0.82), (1, "left", 0.22, 0.76)):
        s_k = _bump(level, lo, hi)
        if s_k <= 0.15:
            continue
        sz = (0.35 + 0.65 * s_k) / hab ** 0.5
        cx, cy = side * (rv + U(0.2, 0.26) + 0.1 * s_ps), yv + U(-0.02, 0.06) - 0.06 * s_ps
        ang = -side * U(0.35, 0.7)
        m = cv.blob(cx, cy, 0.1 * sz, 0.15 * sz, angle=ang, harm=cv.harmonics(0.03)) & cavity
        cortex = U(140, 190) if enhanced else U(28, 38)
        sid = cv.structure(f"kidney_{name}", m, cortex)
        organs[f"kidney_{name}"] = sid
        if enhanced and rng.random() < 0.5:  # corticomedullary phase: darker medulla
            cv.paint(cv.erode(m, max(2, cv.px(0.025))), U(70, 100), sid)
        if s_k > 0.55:
            hil = cv.blob(cx - side * 0.08 * sz * math.cos(ang) * 1.2, cy - 0.05 * sz, 0.06 * sz, 0.05 * sz) & m
            cv.paint(hil, U(-90, -60), 0)  # sinus fat: not part of the kidney label
            pel = cv.blob(cx - side * 0.06 * sz, cy - 0.04 * sz, 0.03 * sz, 0.025 * sz) & hil
            cv.paint(pel, U(0, 20), sid)

    # Colon: ascending (right), descending (left), transverse (anterior, middle levels), sigmoid (low).
    s_co = _ramp(level, 0.3, 0.45)
    if s_co > 0:
        parts = [cv.blob(-0.62 + U(-0.05, 0.05), U(-0.1, 0.1), U(0.07, 0.11), U(0.07, 0.11), harm=cv.harmonics(0.08)),
                 cv.blob(0.64 + U(-0.05, 0.04), U(-0.05, 0.12), U(0.05, 0.08), U(0.05, 0.08), harm=cv.harmonics(0.08))]
        if 0.35 < level < 0.6 and rng.random() < 0.8:
            yt = -h * U(0.45, 0.6)
            parts.append(cv.capsule([(-0.45, yt + 0.1), (0.0, yt + U(-0.05, 0.05)), (0.45, yt + 0.08)],
                                    [U(0.05, 0.08), U(0.05, 0.08), U(0.05, 0.08)]))
        if level > 0.8:
            parts.append(cv.blob(0.35, h * 0.1, U(0.06, 0.09), U(0.05, 0.08), harm=cv.harmonics(0.08)))
        m = np.zeros_like(cavity)
        for p in parts:
            m |= p
        m &= cavity & (cv.owner == 0)
        sid = cv.structure("colon", m, U(35, 45))
        organs["colon"] = sid
        lumen = cv.erode(m, max(1, cv.px(0.015)))
        cv.paint(lumen, U(10, 35), sid)  # stool
        bubbles = np.zeros_like(m)
        for x, y in cv.sample_in(lumen, int(U(3, 12))):
            r = U(0.01, 0.035)
            bubbles |= cv.blob(x, y, r, r)
        cv.paint(bubbles & lumen, -1000.0, sid)
        if rng.random() < 0.5:
            gas = lumen & cv.erode(m, max(1, cv.px(0.015))) & (rng.random() < 0.5)
            cv.paint(gas, -1000.0, sid)

    # Vessels: aorta (patient left of midline), IVC (right); iliac vessels below the bifurcation.
    aorta_hu = U(150, 210) if enhanced else U(35, 48)
    ivc_hu = U(100, 160) if enhanced else U(33, 45)
    ra = U(0.055, 0.075) / hab ** 0.5
    if level < 0.86:
        m = cv.blob(0.05 + U(-0.02, 0.03), y_front - ra - 0.01, ra, ra * U(0.9, 1.05))
        organs["aorta"] = cv.structure("aorta", m, aorta_hu)
        if rng.random() < 0.25:  # wall calcification
            for x, y in cv.sample_in(m & ~cv.erode(m, 1), 1):
                cv.paint(cv.blob(x, y, 0.012, 0.012) & m, U(400, 800), owner=None)
        m = cv.blob(-0.13 + U(-0.02, 0.02), y_front - 0.05, U(0.06, 0.085), U(0.035, 0.06), angle=U(-0.3, 0.3))
        organs["inferior_vena_cava"] = cv.structure("inferior_vena_cava", m, ivc_hu)
    else:
        spread = _ramp(level, 0.86, 1.0)
        for side, name in ((-1, "right"), (1, "left")):
            r = ra * 0.65
            m = cv.blob(side * (0.06 + 0.2 * spread), y_front - r - 0.02, r, r)
            cv.structure(f"iliac_artery_{name}", m, aorta_hu)
            m = cv.blob(side * (0.1 + 0.22 * spread), y_front - r * 0.2, r * 1.2, r * 0.9)
            cv.structure(f"iliac_vena_{name}", m, ivc_hu)

    # Small bowel: loops packed into the free visceral fat, one multi-part instance.
    s_sb = _ramp(level, 0.15, 0.5)
    if s_sb > 0:
        free = cavity & (cv.owner == 0) & (cv.Y < y_front + 0.05) & (cv.hu < -50)
        oral = rng.random() < cfg.p_oral_contrast
        loops = np.zeros_like(free)
        lumens = []
        target = s_sb * U(0.55, 0.85) * free.sum()  # fraction of the free fat filled with bowel
        avail = cv.erode(free, 2)
        for _ in range(40):
            if loops.sum() >= target:
                break
            pos = cv.sample_in(avail & ~loops, 1)
            if not pos:
                break
            r = U(0.05, 0.1)
            loop = cv.blob(*pos[0], r, r * U(0.55, 1.0), angle=U(0, math.pi), harm=cv.harmonics(0.1)) & free
            loops |= loop
            lumens.append(loop)
        sid = cv.structure("small_bowel", loops, U(60, 90) if enhanced else U(35, 45))
        organs["small_bowel"] = sid
        for loop in lumens:
            lumen = cv.erode(loop, max(1, cv.px(0.012))) & loops
            c = rng.random()
            hu = U(-1000, -900) if c < 0.15 else (U(180, 300) if oral else U(0, 30))
            cv.paint(lumen, hu, sid)
            if c >= 0.15 and rng.random() < 0.25:  # small gas bubble on the anterior side of the loop
                pos = cv.sample_in(lumen, 1)
                if pos:
                    r = U(0.01, 0.025)
                    cv.paint(cv.blob(*pos[0], r, r) & lumen, -1000.0, sid)
    # Mesenteric vessels: small dots in the remaining fat (not labelled).
    mes = cavity & (cv.owner == 0) & (cv.hu < -50) & (cv.Y < y_front)
    dots = np.zeros_like(mes)
    for x, y in cv.sample_in(mes, int(U(4, 14))):
        r = U(0.008, 0.02)
        dots |= cv.blob(x, y, r, r)
    cv.paint(dots & mes, U(100, 160) if enhanced else U(30, 45))

    # Vertebra: cortical rim + cancellous body, posterior arch, spinous and transverse processes.
    vname = next(n for lim, n in _VERTEBRA_NAMES if level < lim)
    disc = rng.random() < cfg.p_disc
    vb = cv.blob(0.0, yv, rv * U(1.05, 1.2), rv * U(0.85, 0.95), post_exp=2.0, harm=cv.harmonics(0.02))
    ycan = yv + rv * 0.9 + 0.05
    rc = U(0.04, 0.055)
    arch = cv.blob(0.0, ycan, rc + 0.035, rc + 0.03)
    transverse = rng.random() < 0.5
    for side in (-1, 1):
        arch |= cv.blob(side * rc * 1.1, yv + rv * 0.75, 0.025, 0.05)  # pedicles
        if transverse:
            arch |= cv.blob(side * (rv * 1.15 + 0.05), yv + rv * 0.75, U(0.06, 0.1), 0.022, angle=side * U(0.0, 0.35))
    arch |= cv.capsule([(0.0, ycan + rc), (0.0, ycan + rc + U(0.14, 0.2))], [0.03, 0.018])  # spinous process
    cortical = U(700, 1000)
    cancellous = U(200, 300)
    bone = (vb | arch) & cavity | (arch & outer)
    if disc:
        sid = cv.structure("intervertebral_disc", vb, U(70, 100))
        cv.paint(arch & ~vb, cortical, cv.add(f"vertebra_{vname}"))
    else:
        sid = cv.structure(f"vertebra_{vname}", bone, cortical)
        cv.paint(cv.erode(vb, max(1, cv.px(0.018))), cancellous, sid)
        cv.paint(cv.erode(arch, 2) & ~vb, cancellous + 100, sid)
    canal = cv.blob(0.0, ycan, rc, rc * 0.9)
    sid = cv.structure("spinal_canal", canal, U(5, 15))
    cv.paint(cv.blob(0.0, ycan, rc * 0.55, rc * 0.5), U(30, 40), sid)  # cord inside the CSF

    # Ribs and costal cartilages: in the muscle wall, fewer going down.
    n_ribs = int(round(4 * _ramp(level, 0.6, 0.05) + U(-0.5, 0.5)))
    for side, name in ((-1, "right"), (1, "left")):
        angles = np.sort(rng.uniform(0.25 * math.pi, 0.85 * math.pi, size=max(0, n_ribs)))
        for k, a in enumerate(angles):
            rx_, ry_ = 1.0 - t_fat - t_mus * 0.5, h - t_fat - t_mus * 0.5  # a = 0: posterior midline
            x, y = side * rx_ * math.sin(a), ry_ * math.cos(a)
            tangent = math.atan2(-ry_ * math.sin(a), side * rx_ * math.cos(a))
            m = cv.blob(x, y, U(0.04, 0.08), U(0.018, 0.026), angle=tangent) & outer
            hu = U(120, 220) if a > 0.75 * math.pi else U(600, 900)
            sid = cv.structure(f"rib_{name}_{k + 1}" if a <= 0.75 * math.pi else f"costal_cartilage_{name}_{k + 1}", m, hu)
            if a <= 0.75 * math.pi:
                cv.paint(cv.erode(m, 1), U(150, 300), sid)

    # Lung bases: posterolateral costophrenic recesses, shrinking downwards.
    s_lu = _ramp(level, 0.2, 0.0)
    if s_lu > 0:
        inner = body(t_fat + t_mus)
        core = body(t_fat + t_mus + 0.03 + U(0.04, 0.1) * s_lu)
        for side, name in ((-1, "right"), (1, "left")):
            m = inner & ~core & (cv.Y > yv - U(0.0, 0.25) * s_lu) & (side * cv.X > rv * 1.6)
            m &= (cv.owner == 0) | (cv.owner == organs.get("liver", -1)) | (cv.owner == organs.get("spleen", -1))
            cv.structure(f"lung_{name}", m, U(-880, -800))

    # Iliac wings at the bottom: curved plates from the sacroiliac joints, iliacus muscle inside.
    s_il = _ramp(level, 0.82, 1.0)
    if s_il > 0:
        for side, name in ((-1, "right"), (1, "left")):
            reach = 0.25 + 0.3 * s_il
            pts = [(side * (rv + 0.1), yv + 0.1), (side * (rv + 0.1 + 0.35 * reach), yv + 0.06),
                   (side * (rv + 0.12 + 0.6 * reach), yv - 0.05 - 0.1 * s_il),
                   (side * (rv + 0.1 + 0.75 * reach), yv - 0.18 - 0.15 * s_il)]
            m = cv.capsule(pts, [0.05, 0.04, 0.03, 0.022]) & outer
            iliacus = cv.capsule([(x - side * 0.06, y - 0.02) for x, y in pts[1:]], [0.05, 0.06, 0.04]) & cavity & ~m
            cv.structure(f"iliacus_{name}", iliacus & (cv.owner == 0), musc())
            sid = cv.structure(f"hip_{name}", m, cortical * 0.9)
            cv.paint(cv.erode(m, 1), cancellous, sid)
            glut = cv.capsule([(x + side * 0.07, y + 0.05) for x, y in pts], [0.07, 0.07, 0.05, 0.03]) & wall_in & ~m
            cv.paint(glut & ~cavity, musc())

    # Lesions in solid organs: hypo- or hyperdense, small to medium.
    n_les = int(rng.poisson(cfg.lesion_rate))
    hosts = [k for k in ("liver", "liver", "liver", "spleen", "kidney_right", "kidney_left") if k in organs]
    for _ in range(n_les if hosts else 0):
        host = hosts[int(rng.integers(len(hosts)))]
        hmask = cv.owner == organs[host]
        r = U(0.025, 0.09) if host == "liver" else U(0.02, 0.05)
        pos = cv.sample_in(cv.erode(hmask, max(1, cv.px(r * 0.6))), 1)
        if not pos:
            continue
        m = cv.blob(*pos[0], r, r * U(0.7, 1.0), angle=U(0, math.pi), harm=cv.harmonics(0.1)) & hmask
        host_hu = float(np.median(cv.hu[hmask]))
        if rng.random() < 0.7:  # hypodense: cyst or metastasis
            hu = min(host_hu - 30, U(-5, 45))
        else:  # hyperdense: enhancing lesion / haemorrhage
            hu = host_hu + U(40, 90)
        cv.structure(f"{host.split('_')[0]}_lesion", m, hu)

    # CT couch below the back (not labelled).
    if rng.random() < cfg.p_couch:
        yc = h + U(0.03, 0.1)
        thick = U(0.012, 0.025)
        curv = U(0.0, 0.12)
        band = (np.abs(cv.Y - (yc - curv * cv.X ** 2)) < thick) & (np.abs(cv.X) < U(1.1, 1.5)) & ~outer
        cv.paint(band, U(-300, 100))

    info["organs"] = sorted(organs)
    info["body_h"] = h
    return info


# --------------------------------------------------------------------------------------- one slice
def generate_slice(rng: np.random.Generator, size: int = 256, *, level: float | None = None,
                   label_dropout: float = 0.15, config: PhantomConfig | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one phantom slice.

    Returns ``(image, labels, info)``: ``image`` uint8 (size, size) in the level 40 / width 400
    window; ``labels`` uint8 (size, size), 0 = background or unlabelled, the labelled structures
    numbered with a random permutation of 1..K; ``info`` = ``{"hu": float32 HU image,
    "structures": {label: name}, "unlabelled": [names of visible but unlabelled structures],
    "level": float, "phase": "enhanced" | "unenhanced"}``.
    """
    cfg = config or PhantomConfig()
    cfg.validate()
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ConfigError(f"phantom size must be an integer >= 32 pixels, got {size!r}")
    if not 0.0 <= label_dropout < 1.0:
        raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if level is None:
        level = float(rng.uniform(0.0, 1.0))
    elif not 0.0 <= level <= 1.0:
        raise ConfigError(f"phantom level must be in [0, 1] (0 = T11, 1 = iliac crests), got {level}")
    size = int(size)
    cv = _Canvas(rng, size, cfg)
    info = _draw_anatomy(cv, float(level), cfg)

    # Visible structures: enough pixels left after everything drawn on top.
    min_area = max(4, int(round(cfg.min_area * (size / 256.0) ** 2)))
    area = np.bincount(cv.owner.ravel(), minlength=len(cv.names) + 1)
    visible = [k for k in range(1, len(cv.names) + 1) if area[k] >= min_area]
    # Partial labels: drop some at random, keeping min..max labelled structures.
    n_vis = len(visible)
    n_drop = int(rng.binomial(n_vis, label_dropout)) if label_dropout > 0 else 0
    n_keep = min(max(n_vis - n_drop, min(cfg.min_structures, n_vis)), cfg.max_structures)
    keep = sorted(rng.choice(visible, size=n_keep, replace=False).tolist()) if n_keep else []
    perm = rng.permutation(n_keep) + 1
    lut = np.zeros(len(cv.names) + 1, dtype=np.uint8)
    structures = {}
    for k, lab in zip(keep, perm):
        lut[k] = lab
        structures[int(lab)] = cv.names[k - 1]
    labels = lut[cv.owner]
    unlabelled = [cv.names[k - 1] for k in visible if k not in set(keep)]

    # Image formation: partial-volume blur, cupping, correlated noise, window.
    scale = size / 256.0
    hu = ndimage.gaussian_filter(cv.hu, rng.uniform(*cfg.blur_sigma) * scale, mode="nearest")
    r2 = (cv.X ** 2 + (cv.Y / info["body_h"]) ** 2)
    hu -= np.float32(rng.uniform(*cfg.cupping)) * np.clip(1.0 - r2, 0.0, 1.0)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, cfg.noise_corr * scale, mode="wrap")
    noise *= np.float32(rng.uniform(*cfg.noise_std) / max(1e-6, float(noise.std())))
    hu += noise
    image = window(hu)
    info = {"hu": hu.astype(np.float32), "structures": dict(sorted(structures.items())),
            "unlabelled": unlabelled, "level": float(level), "phase": info["phase"]}
    return image, labels, info


# ------------------------------------------------------------------------------------- data set
_SPLIT_CODE = {"train": 0, "test": 1}


def _slice_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator per (seed, split, index): image i is the same whatever the set sizes
    or the number of workers."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_SPLIT_CODE[split], int(index))))


def _make_one(job: tuple) -> tuple[np.ndarray, dict]:
    """Worker: draw slice ``index`` of ``split``, write its PNG, return (labels, metadata)."""
    from d2ct.data.images import write_slice

    split, index, folder, size, seed, label_dropout, cfg = job
    image, labels, info = generate_slice(_slice_rng(seed, split, index), size, label_dropout=label_dropout, config=cfg)
    write_slice(Path(folder) / f"{index}.png", image)
    meta = {k: info[k] for k in ("structures", "unlabelled", "level", "phase")}
    return labels, meta


def _params(n_train, n_labelled, n_test, size, seed, label_dropout, cfg, pool_truth) -> dict:
    return {"generator": "d2ct.data.phantom", "version": PHANTOM_VERSION, "n_train": n_train,
            "n_labelled": n_labelled, "n_test": n_test, "size": size, "seed": seed,
            "label_dropout": label_dropout, "pool_truth": pool_truth,
            "config": json.loads(json.dumps(asdict(cfg)))}


def _expected_files(n_train: int, n_test: int, pool_truth: bool) -> list[str]:
    files = [PARAMS_FILE, "manifest.csv", "labels.csv.gz", "annotated.json"]
    files += [f"train-images/{i}.png" for i in range(n_train)]
    if n_test:
        files += ["test-labels.csv.gz"] + [f"test-images/{i}.png" for i in range(n_test)]
    if pool_truth:
        files.append("train-truth-labels.csv.gz")
    return files


def phantom_is_complete(root: str | os.PathLike, params: dict) -> bool:
    """True when ``root`` holds a finished phantom data set written with exactly ``params``."""
    root = Path(root)
    try:
        if read_json(root / PARAMS_FILE) != params:
            return False
    except (OSError, ValueError):
        return False
    return all((root / f).is_file() for f in _expected_files(params["n_train"], params["n_test"], params["pool_truth"]))


def write_phantom_dataset(root: str | os.PathLike, *, n_train: int = 60, n_labelled: int = 20, n_test: int = 20,
                          size: int = 256, seed: int = 0, workers: int = 1, label_dropout: float = 0.15,
                          config: PhantomConfig | None = None, pool_truth: bool = False,
                          overwrite: bool = False, progress: bool = True) -> Path:
    """Write a phantom data set in the challenge layout and return its folder.

    ``root/`` gets ``train-images/<i>.png`` (i = 0..n_train-1), ``labels.csv.gz`` (one column per
    training image; the first ``n_labelled`` hold label maps, the others are all zeros: the
    unlabelled pool), ``annotated.json``, ``test-images/<i>.png`` + ``test-labels.csv.gz`` (the
    truth, for evaluation), ``manifest.csv`` (id, file (the image name, in ``<split>-images/``), split,
    annotated, level, phase,
    n_structures, structures as ``label=name;...``, unlabelled) and ``phantom.json`` (the
    parameters). ``pool_truth`` also writes the hidden labels of the pool as
    ``train-truth-labels.csv.gz`` (for measuring pseudo-labels).

    Files are byte-identical for the same parameters (any ``workers``). When ``root`` already holds
    a complete set with the same parameters nothing is done. Otherwise everything is written to a
    temporary folder renamed onto ``root`` at the end; an existing ``root`` is replaced when it is an
    older phantom set (it has ``phantom.json``) or empty, or when ``overwrite``; anything else is a
    DataError.
    """
    cfg = config or PhantomConfig()
    cfg.validate()
    for name, v, lo in (("n_train", n_train, 1), ("n_labelled", n_labelled, 0), ("n_test", n_test, 0),
                        ("size", size, 32), ("workers", workers, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"write_phantom_dataset: {name} must be an integer >= {lo}, got {v!r}")
    if n_labelled > n_train:
        raise ConfigError(f"write_phantom_dataset: n_labelled ({n_labelled}) exceeds n_train ({n_train})")
    if not 0.0 <= label_dropout < 1.0:
        raise ConfigError(f"write_phantom_dataset: label_dropout must be in [0, 1), got {label_dropout}")
    n_train, n_labelled, n_test, size, seed = int(n_train), int(n_labelled), int(n_test), int(size), int(seed)
    root = Path(root)
    params = _params(n_train, n_labelled, n_test, size, seed, float(label_dropout), cfg, bool(pool_truth))
    if phantom_is_complete(root, params):
        return root
    replace = overwrite or (root / PARAMS_FILE).is_file()
    with atomic_directory(root, overwrite=replace) as tmp:
        _write_phantom(tmp, params, cfg, int(workers), progress)
    return root


def _write_phantom(tmp: Path, params: dict, cfg: PhantomConfig, workers: int, progress: bool) -> None:
    from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

    from d2ct.data.labels_csv import write_labels_csv

    n_train, n_labelled, n_test = params["n_train"], params["n_labelled"], params["n_test"]
    jobs = [("train", i, str(tmp / "train-images"), params["size"], params["seed"], params["label_dropout"], cfg)
            for i in range(n_train)]
    jobs += [("test", i, str(tmp / "test-images"), params["size"], params["seed"], params["label_dropout"], cfg)
             for i in range(n_test)]
    (tmp / "train-images").mkdir()
    if n_test:
        (tmp / "test-images").mkdir()
    bar = dict(total=len(jobs), desc="phantom", unit="slice", disable=not progress, leave=False)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_make_one, jobs, chunksize=4), **bar))
    else:
        results = [_make_one(j) for j in tqdm(jobs, **bar)]

    train, test = results[:n_train], results[n_train:]
    names = [f"{i}.png" for i in range(n_train)]
    maps = np.stack([lab for lab, _ in train])
    if params["pool_truth"]:
        write_labels_csv(tmp / "train-truth-labels.csv.gz", names, maps)
    maps[n_labelled:] = 0  # the unlabelled pool
    write_labels_csv(tmp / "labels.csv.gz", names, maps)
    del maps
    atomic_write_json(tmp / "annotated.json", {"annotated": names[:n_labelled]})
    if n_test:
        write_labels_csv(tmp / "test-labels.csv.gz", [f"{i}.png" for i in range(n_test)], np.stack([lab for lab, _ in test]))

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "file", "split", "annotated", "level", "phase", "n_structures", "structures", "unlabelled"])
    for split, rows, n_ann in (("train", train, n_labelled), ("test", test, len(test))):
        for i, (_, meta) in enumerate(rows):
            w.writerow([i, f"{i}.png", split, i < n_ann, f"{meta['level']:.4f}", meta["phase"],
                        len(meta["structures"]), ";".join(f"{k}={v}" for k, v in meta["structures"].items()),
                        ";".join(meta["unlabelled"])])
    with atomic_write(tmp / "manifest.csv", "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    atomic_write_json(tmp / PARAMS_FILE, params)  # last: marks the set complete


def write_preview(root: str | os.PathLike, path: str | os.PathLike, *, n: int = 8, split: str = "train",
                  cols: int = 4) -> Path:
    """Draw the first ``n`` labelled slices of a challenge-layout folder (``split`` "train" or
    "test") with their labels overlaid, in a grid of ``cols`` columns, to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from d2ct.data.challenge import ChallengeDataset
    from d2ct.utils.fileio import atomic_path

    ds = ChallengeDataset.open(root)
    if split == "test":
        ds = ds.test_split()
        if ds is None:
            raise DataError(f"{root}: no test-images/ folder to preview")
    elif split != "train":
        raise ConfigError(f"write_preview: split must be 'train' or 'test', got {split!r}")
    names = (ds.labelled_names or ds.names)[: max(1, int(n))]
    cols = max(1, min(int(cols), len(names)))
    rows = math.ceil(len(names) / cols)
    colours = plt.get_cmap("tab20")(np.arange(20))
    cmap = ListedColormap(np.concatenate([colours[0::2], colours[1::2]]))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        img = ds.read_image(name)
        lab = ds.label_map(name)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        k = 0
        if lab is not None and lab.any():
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=19, alpha=0.45,
                      interpolation="nearest")
            present = np.unique(lab[lab > 0])
            k = present.size
            for v, (cy, cx) in zip(present, ndimage.center_of_mass(np.ones_like(lab), lab, present)):
                ax.text(cx, cy, str(int(v)), color="white", fontsize=6, ha="center", va="center")
        ax.set_title(f"{split} {name} | {k} labelled", fontsize=8)
    fig.suptitle("anterior up, patient right on image left", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ 3-D volume
#: Bump when the 3-D drawing changes.
PHANTOM_VOLUME_VERSION = 1


def _harm(rng: np.random.Generator, amp: float, kmax: int = 4) -> list[tuple[int, float, float]]:
    """The radial perturbation of :meth:`_Canvas.harmonics`, drawn once for a whole volume."""
    return [(k, float(rng.normal(0, amp / k)), float(rng.uniform(0, 2 * math.pi))) for k in range(2, kmax + 1)]


def _volume_case(rng: np.random.Generator, cfg: PhantomConfig, n_loops: int = 14) -> dict:
    """Everything random about one 3-D case, drawn once, so that the anatomy of neighbouring slices
    differs only through the craniocaudal ``level`` (the same HU ranges as the 2-D phantom)."""
    U = rng.uniform
    enhanced = bool(rng.random() < cfg.p_enhanced)
    hab = U(*cfg.habitus)
    P = {
        "enhanced": enhanced, "hab": hab, "aspect": U(*cfg.body_aspect), "body_harm": _harm(rng, 0.025),
        "post_exp": U(2.3, 3.2), "t_fat": U(0.04, 0.09) * hab ** 3 + 0.02, "t_mus": U(0.035, 0.06) / hab,
        "skin": U(20, 40), "subcut": U(-115, -90), "wall": U(40, 55), "fat": U(-100, -80),
        "rv": U(0.10, 0.125) / hab, "yv_f": U(0.22, 0.32), "musc": [U(45, 58) for _ in range(10)],
        "auto_r": (U(0.14, 0.19) / hab ** 0.5, U(0.15, 0.2) / hab ** 0.5), "auto_harm": _harm(rng, 0.05),
        "psoas_harm": _harm(rng, 0.04), "rect": (U(0.012, 0.03), U(0.09, 0.13), U(0.025, 0.04), U(0.02, 0.035)),
        "liver_hu": U(80, 105) if enhanced else U(52, 66), "liver_ang": U(-0.3, 0.3), "liver_harm": _harm(rng, 0.08),
        "ll_ang": U(-0.2, 0.3), "ll_harm": _harm(rng, 0.06),
        "gb": (U(-0.06, 0.06), U(0.25, 0.45), U(0.05, 0.09), U(0.06, 0.11), U(0, math.pi), U(0, 20)),
        "gb_harm": _harm(rng, 0.04),
        "spleen_hu": U(105, 125) if enhanced else U(40, 50), "spleen_ang": U(-0.7, -0.3), "spleen_harm": _harm(rng, 0.05),
        "stomach": (U(-0.05, 0.08), U(0.3, 0.5), U(0.8, 1.1), U(0.8, 1.1), U(-0.6, 0.2)), "stomach_harm": _harm(rng, 0.06),
        "stomach_hu": (U(50, 80) if enhanced else U(35, 45), U(0, 25), U(-1000, -950), U(-0.2, 0.7)),
        "pancreas": (U(0.16, 0.22), U(-1, 1), U(0.05, 0.075), U(0.035, 0.055), U(90, 110) if enhanced else U(35, 48)),
        "kidney": [(U(0.2, 0.26), U(-0.02, 0.06), U(0.35, 0.7)) for _ in range(2)], "kidney_harm": _harm(rng, 0.03),
        "cortex": U(140, 190) if enhanced else U(28, 38), "sinus": U(-90, -60), "pelvis": U(0, 20),
        "colon": (U(-0.05, 0.05), U(-0.1, 0.1), U(0.07, 0.1), U(-0.05, 0.04), U(-0.05, 0.12), U(0.05, 0.08),
                  U(0.45, 0.6), U(0.05, 0.075)),
        "colon_hu": (U(35, 45), U(10, 35)),
        "aorta": (U(-0.02, 0.03), U(0.055, 0.075) / hab ** 0.5, U(150, 210) if enhanced else U(35, 48)),
        "ivc": (U(-0.02, 0.02), U(0.06, 0.085), U(0.035, 0.06), U(-0.3, 0.3), U(100, 160) if enhanced else U(33, 45)),
        "bowel_hu": (U(60, 90) if enhanced else U(35, 45), U(0, 30)),
        "bone": (U(700, 1000), U(200, 300), U(70, 100)), "canal": (U(0.04, 0.055), U(5, 15), U(30, 40)),
        "vb": (U(1.05, 1.2), U(0.85, 0.95)), "lung": (U(-880, -800), U(0.04, 0.1), U(0.0, 0.25)),
    }
    # small-bowel loops: 3-D ellipsoids at random body-frame positions and levels
    P["loops"] = [(U(-0.45, 0.45), U(-0.55, 0.05), U(0.25, 0.85), U(0.06, 0.1), U(0.08, 0.16), U(0.55, 1.0),
                   U(0, math.pi)) for _ in range(n_loops)]
    # one liver lesion: a sphere (body units; level units scaled by the volume's span)
    P["lesion"] = (U(-0.6, -0.35), U(-0.1, 0.15), U(0.15, 0.4), U(0.05, 0.08),
                   (U(-5, 45) if rng.random() < 0.7 else None))
    return P


def _draw_anatomy_3d(cv: _Canvas, level: float, P: dict, mm_per_level: float, mm_per_unit: float) -> None:
    """One axial slice of the 3-D case ``P`` at ``level``: the organs of the 2-D phantom with their
    random parameters fixed for the whole volume (shapes change smoothly with ``level``). Simplified:
    no ribs, no vessel bifurcation, the vertebral column is one structure (vertebrae and discs
    stacked with the same cross-section cannot be told apart from masks alone)."""
    hab, h = P["hab"], P["aspect"] * (1.0 - 0.08 * _ramp(level, 0.3, 1.0))
    t_fat, t_mus = P["t_fat"], P["t_mus"]

    def body(off: float) -> np.ndarray:
        return cv.blob(0.0, 0.0, 1.0 - off, h - off, harm=P["body_harm"], post_exp=P["post_exp"])

    outer = body(0.0)
    cv.paint(outer, P["skin"])
    cv.paint(body(cv.bu(1.2)), P["subcut"])
    wall_in = body(t_fat)
    cv.paint(wall_in, P["wall"])
    cavity = body(t_fat + t_mus)
    cv.paint(cavity, P["fat"])
    rv = P["rv"]
    yv = h * P["yv_f"]
    y_front = yv - rv * 0.85
    musc = P["musc"]
    for i, (side, name) in enumerate(((-1, "right"), (1, "left"))):
        ax, ay = P["auto_r"]
        m = cv.blob(side * (0.08 + rv * 0.8), yv + rv + 0.15, ax, ay, angle=side * 0.15, harm=P["auto_harm"]) & wall_in
        cv.structure(f"autochthon_{name}", m, musc[i])
    s_ps = _ramp(level, 0.3, 0.85)
    if s_ps > 0:
        for i, (side, name) in enumerate(((-1, "right"), (1, "left"))):
            r = (0.03 + 0.07 * s_ps) / hab
            m = cv.blob(side * (rv + r * 0.7), yv - 0.01 + 0.02 * s_ps, r * 0.92, r * 1.12, angle=side * 0.4,
                        harm=P["psoas_harm"]) & cavity
            cv.structure(f"psoas_{name}", m, musc[2 + i])
    gap, rx, ry, dy = P["rect"]
    for i, (side, name) in enumerate(((-1, "right"), (1, "left"))):
        m = cv.blob(side * (gap + rx), -(h - t_fat - dy), rx, ry, angle=-side * 0.12) & wall_in
        cv.structure(f"rectus_abdominis_{name}", m, musc[4 + i])

    liver = None
    s_liv = _ramp(level, 0.66, 0.0)
    if s_liv > 0:
        cx, cy = -0.45 + 0.1 * (1 - s_liv), 0.12 * (1 - s_liv)
        m = cv.blob(cx, cy, (0.18 + 0.38 * s_liv) / hab ** 0.5, (0.16 + 0.42 * s_liv) * h / 0.75 / hab ** 0.5,
                    angle=P["liver_ang"], harm=P["liver_harm"])
        s_ll = _ramp(level, 0.35, 0.05)
        if s_ll > 0:  # left lobe across the midline, joined to the right lobe
            m |= cv.blob(0.05 + 0.1 * s_ll - 0.15 * (1 - s_ll), -h * 0.42, 0.12 + 0.2 * s_ll, 0.06 + 0.1 * s_ll,
                         angle=P["ll_ang"], harm=P["ll_harm"])
        m &= cavity
        liver = cv.structure("liver", m, P["liver_hu"])
        lx, ly, lz, lr, lhu = P["lesion"]
        dz = (level - lz) * mm_per_level / mm_per_unit  # body units
        if abs(dz) < lr:
            r = math.sqrt(lr * lr - dz * dz)
            les = cv.blob(lx, ly, r, r) & (cv.owner == liver)
            cv.structure("liver_lesion", les, lhu if lhu is not None else P["liver_hu"] + 60)
    s_gb = _bump(level, 0.25, 0.58)
    if s_gb > 0.2 and liver is not None:
        gx, gy, grx, gry, gang, ghu = P["gb"]
        m = cv.blob(-0.28 + gx, -h * gy, grx * s_gb, gry * s_gb, angle=gang, harm=P["gb_harm"]) & cavity
        cv.structure("gallbladder", m, ghu)
    s_spl = _bump(level, -0.1, 0.45)
    if s_spl > 0.1:
        cx, cy, rx, ry = 0.6, yv * 0.6, (0.08 + 0.08 * s_spl) / hab ** 0.5, (0.14 + 0.14 * s_spl) / hab ** 0.5
        m = cv.blob(cx, cy, rx, ry, angle=P["spleen_ang"], harm=P["spleen_harm"])
        m &= ~cv.blob(cx - rx * 1.1, cy - 0.02, rx * 0.7, ry * 0.8)
        cv.structure("spleen", m & cavity, P["spleen_hu"])
    s_st = _ramp(level, 0.48, 0.1)
    if s_st > 0:
        ox, oy, fx, fy, ang = P["stomach"]
        cx, cy = 0.3 + ox, -h * oy
        rx, ry = (0.12 + 0.14 * s_st) * fx, (0.1 + 0.1 * s_st) * fy
        m = cv.blob(cx, cy, rx, ry, angle=ang, harm=P["stomach_harm"]) & cavity
        wall_hu, fluid, gas_hu, gas_f = P["stomach_hu"]
        sid = cv.structure("stomach", m, wall_hu)
        lumen = cv.erode(m, max(1.5, cv.px(0.022)))
        cv.paint(lumen, fluid, sid)
        cv.paint(lumen & (cv.Y < cy - ry * gas_f), gas_hu, sid)
    s_pa = _bump(level, 0.28, 0.56)
    if s_pa > 0.2:
        dyp, wig, r0, r1, phu = P["pancreas"]
        yp = y_front - dyp
        reach = min(1.0, (s_pa - 0.2) / 0.5)  # the gland lengthens smoothly from the head to the tail
        pts = [(-0.2, yp + 0.04), (-0.05, yp - 0.02), (0.15, yp - 0.01), (0.35, yp + 0.04 * wig), (0.48, yv * 0.5)]
        k = reach * (len(pts) - 1)
        n = int(math.floor(k))
        pts2 = pts[:n + 1]
        if n < len(pts) - 1 and k > n:
            t = k - n
            pts2 = pts2 + [(pts[n][0] + t * (pts[n + 1][0] - pts[n][0]), pts[n][1] + t * (pts[n + 1][1] - pts[n][1]))]
        if len(pts2) == 1:
            pts2 = [pts[0], pts[0]]
        m = cv.capsule(pts2, [r0] + [r1] * (len(pts2) - 1)) & cavity & (cv.owner == 0)
        cv.structure("pancreas", m, phu)
    s_ps_k = s_ps
    for i, (side, name, lo, hi) in enumerate(((-1, "right", 0.28, 0.82), (1, "left", 0.22, 0.76))):
        s_k = _bump(level, lo, hi)
        if s_k <= 0.15:
            continue
        dx, dyk, angf = P["kidney"][i]
        sz = (0.35 + 0.65 * s_k) / hab ** 0.5
        cx, cy = side * (rv + dx + 0.1 * s_ps_k), yv + dyk - 0.06 * s_ps_k
        ang = -side * angf
        m = cv.blob(cx, cy, 0.1 * sz, 0.15 * sz, angle=ang, harm=P["kidney_harm"]) & cavity
        sid = cv.structure(f"kidney_{name}", m, P["cortex"])
        if s_k > 0.55:
            hil = cv.blob(cx - side * 0.08 * sz * math.cos(ang) * 1.2, cy - 0.05 * sz, 0.06 * sz, 0.05 * sz) & m
            cv.paint(hil, P["sinus"], 0)
            cv.paint(cv.blob(cx - side * 0.06 * sz, cy - 0.04 * sz, 0.03 * sz, 0.025 * sz) & hil, P["pelvis"], sid)
    s_co = _ramp(level, 0.3, 0.45)
    if s_co > 0:
        ax_, ay_, ar, dx_, dy_, dr, yt_f, tr = P["colon"]
        parts = cv.blob(-0.62 + ax_, ay_, ar * s_co, ar * s_co) | cv.blob(0.64 + dx_, dy_, dr * s_co, dr * s_co)
        s_tr = _bump(level, 0.35, 0.6)
        if s_tr > 0.3:
            yt = -h * yt_f
            parts |= cv.capsule([(-0.6, ay_), (-0.45, yt + 0.1), (0.0, yt), (0.45, yt + 0.08), (0.62, dy_)],
                                [tr * s_tr] * 5)
        m = parts & cavity & (cv.owner == 0)
        sid = cv.structure("colon", m, P["colon_hu"][0])
        cv.paint(cv.erode(m, max(1, cv.px(0.015))), P["colon_hu"][1], sid)
    ox, ra, ahu = P["aorta"]
    spread = _ramp(level, 0.75, 1.0)
    cv.structure("aorta", cv.blob(0.05 + ox + 0.04 * spread, y_front - ra - 0.01, ra, ra), ahu)
    ox, irx, iry, iang, ihu = P["ivc"]
    cv.structure("inferior_vena_cava", cv.blob(-0.13 + ox - 0.04 * spread, y_front - 0.05, irx, iry, angle=iang), ihu)
    s_sb = _ramp(level, 0.15, 0.5)
    if s_sb > 0:
        free = cavity & (cv.owner == 0) & (cv.Y < y_front + 0.05)
        loops = np.zeros_like(free)
        for x, y, zc, r, half, asp, ang in P["loops"]:
            dz = abs(level - zc) / half
            if dz < 1.0:
                rr = r * math.sqrt(1.0 - dz * dz) * s_sb ** 0.5
                loops |= cv.blob(x, y, rr, rr * asp, angle=ang)
        loops &= free
        if loops.any():
            sid = cv.structure("small_bowel", loops, P["bowel_hu"][0])
            cv.paint(cv.erode(loops, max(1, cv.px(0.012))) & loops, P["bowel_hu"][1], sid)
    cortical, cancellous, disc_hu = P["bone"]
    fx, fy = P["vb"]
    vb = cv.blob(0.0, yv, rv * fx, rv * fy)
    rc, csf, cord = P["canal"]
    ycan = yv + rv * 0.9 + 0.05
    arch = cv.blob(0.0, ycan, rc + 0.035, rc + 0.03)
    for side in (-1, 1):
        arch |= cv.blob(side * rc * 1.1, yv + rv * 0.75, 0.025, 0.05)
    arch |= cv.capsule([(0.0, ycan + rc), (0.0, ycan + rc + 0.17)], [0.03, 0.018])
    # discs every ~0.14 level (one vertebra): same label as the bone (see the docstring)
    phase = (level * 7.2) % 1.0
    in_disc = phase > 0.86
    sid = cv.structure("vertebral_column", ((vb | arch) & cavity) | (arch & outer), cortical)
    cv.paint(cv.erode(vb, max(1, cv.px(0.018))), disc_hu if in_disc else cancellous, sid)
    canal = cv.blob(0.0, ycan, rc, rc * 0.9)
    sid = cv.structure("spinal_canal", canal, csf)
    cv.paint(cv.blob(0.0, ycan, rc * 0.55, rc * 0.5), cord, sid)
    s_lu = _ramp(level, 0.2, 0.0)
    if s_lu > 0:
        lhu, depth, ylim = P["lung"]
        inner = body(t_fat + t_mus)
        core = body(t_fat + t_mus + 0.03 + depth * s_lu)
        for side, name in ((-1, "right"), (1, "left")):
            m = inner & ~core & (cv.Y > yv - ylim * s_lu) & (side * cv.X > rv * 1.6) & (cv.owner == 0)
            cv.structure(f"lung_{name}", m, lhu)
    s_il = _ramp(level, 0.82, 1.0)
    if s_il > 0:
        for i, (side, name) in enumerate(((-1, "right"), (1, "left"))):
            reach = 0.25 + 0.3 * s_il
            pts = [(side * (rv + 0.1), yv + 0.1), (side * (rv + 0.1 + 0.35 * reach), yv + 0.06),
                   (side * (rv + 0.12 + 0.6 * reach), yv - 0.05 - 0.1 * s_il),
                   (side * (rv + 0.1 + 0.75 * reach), yv - 0.18 - 0.15 * s_il)]
            m = cv.capsule(pts, [0.05 * s_il ** 0.5 + 0.01, 0.04, 0.03, 0.022]) & outer & (cv.owner == 0)
            sid = cv.structure(f"hip_{name}", m, cortical * 0.9)
            cv.paint(cv.erode(m, 1), cancellous, sid)


def generate_volume(seed: int = 0, size: int = 128, n_slices: int = 40, *, levels: tuple[float, float] = (0.0, 1.0),
                    fov_mm: float = 380.0, span_mm: float = 210.0, config: PhantomConfig | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A 3-D phantom CT: ``(hu, labels, info)`` in display orientation (Z, H, W): slices run
    inferior -> superior (slice 0 is ``levels[1]``, the lowest), rows anterior -> posterior, columns
    patient right -> left. ``labels`` uint8: one number per 3-D structure, the same on every slice.
    ``info``: ``{"structures": {label: name}, "spacing": (slice, row, col) mm, "levels": [...]}``.

    The organs, HU values, partial-volume blur, noise and cupping are those of the 2-D phantom
    (:func:`generate_slice`), but every random choice is drawn once per volume, so shapes vary
    smoothly from slice to slice; the noise is new on every slice, as in a real scan. ``levels``
    (0 = T11, 1 = iliac crests) spans ``span_mm`` craniocaudally; ``fov_mm`` is the in-plane field
    of view.
    """
    cfg = config or PhantomConfig()
    cfg.validate()
    for name, v, lo in (("size", size, 32), ("n_slices", n_slices, 2)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"generate_volume: {name} must be an integer >= {lo}, got {v!r}")
    lo_l, hi_l = (float(v) for v in levels)
    if not 0.0 <= lo_l < hi_l <= 1.0:
        raise ConfigError(f"generate_volume: levels must be (top, bottom) with 0 <= top < bottom <= 1, got {levels}")
    if not (fov_mm > 0 and span_mm > 0):
        raise ConfigError("generate_volume: fov_mm and span_mm must be > 0")
    size, n_slices = int(size), int(n_slices)
    ss = np.random.SeedSequence(int(seed), spawn_key=(7,))  # 7: apart from the 2-D splits' keys
    case_rng, *slice_seeds = [np.random.default_rng(s) for s in ss.spawn(n_slices + 1)]
    cv = _Canvas(case_rng, size, cfg)
    P = _volume_case(case_rng, cfg)
    blur = case_rng.uniform(*cfg.blur_sigma) * size / 256.0
    noise_std = case_rng.uniform(*cfg.noise_std)
    cupping = case_rng.uniform(*cfg.cupping)
    mm_per_unit = cv.unit * fov_mm / size
    mm_per_level = span_mm  # the whole 0..1 level range
    slice_mm = span_mm * (hi_l - lo_l) / (n_slices - 1)
    z_levels = np.linspace(hi_l, lo_l, n_slices)  # display slice 0 = the most inferior
    names: dict[str, int] = {}
    hu = np.empty((n_slices, size, size), np.float32)
    labels = np.zeros((n_slices, size, size), np.uint8)
    min_area = max(4, int(round(cfg.min_area * (size / 256.0) ** 2)))
    for z, level in enumerate(z_levels):
        cv.hu = np.full((size, size), -1000.0, dtype=np.float32)
        cv.owner = np.zeros((size, size), dtype=np.int16)
        cv.names = []
        _draw_anatomy_3d(cv, float(level), P, mm_per_level, mm_per_unit)
        area = np.bincount(cv.owner.ravel(), minlength=len(cv.names) + 1)
        lut = np.zeros(len(cv.names) + 1, np.uint8)
        for k, name in enumerate(cv.names, start=1):
            if area[k] >= min_area:
                if name not in names:
                    if len(names) == 255:
                        raise DataError("generate_volume: more than 255 structures")
                    names[name] = len(names) + 1
                lut[k] = names[name]
        labels[z] = lut[cv.owner]
        rng = slice_seeds[z]
        img = ndimage.gaussian_filter(cv.hu, blur, mode="nearest")
        r2 = cv.X ** 2 + (cv.Y / (P["aspect"])) ** 2
        img -= np.float32(cupping) * np.clip(1.0 - r2, 0.0, 1.0)
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                        cfg.noise_corr * size / 256.0, mode="wrap")
        noise *= np.float32(noise_std / max(1e-6, float(noise.std())))
        hu[z] = img + noise
    # structures are numbered in the order they first appear, from the lowest slice up
    info = {"structures": {v: k for k, v in sorted(names.items(), key=lambda kv: kv[1])},
            "spacing": (float(slice_mm), float(fov_mm / size), float(fov_mm / size)),
            "levels": [float(v) for v in z_levels], "phase": "enhanced" if P["enhanced"] else "unenhanced",
            "version": PHANTOM_VOLUME_VERSION}
    return hu, labels, info


def volume_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """4x4 RAS+ affine of a display-oriented (Z, H, W) array seen as NIfTI axes (col, row, slice):
    columns towards the patient's left, rows towards posterior, slices superior; centred on 0."""
    z, h, w = shape
    sz, sr, sc = spacing
    aff = np.diag([-sc, -sr, sz, 1.0])
    aff[:3, 3] = [sc * (w - 1) / 2, sr * (h - 1) / 2, -sz * (z - 1) / 2]
    return aff


def write_phantom_volume(out_dir: str | os.PathLike, *, seed: int = 0, size: int = 128, n_slices: int = 40,
                         levels: tuple[float, float] = (0.0, 1.0), overwrite: bool = False,
                         config: PhantomConfig | None = None,
                         preview: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write a 3-D phantom as NIfTI: ``ct.nii.gz`` (HU, int16), ``labels.nii.gz`` (one label per
    3-D structure, uint8) and ``structures.json`` (label -> name, spacing, parameters), stored in
    RAS+ orientation (as ``nibabel.as_closest_canonical`` gives). Same parameters -> identical
    files; atomic (the folder is written aside and renamed into place). ``preview``: also draw an
    axial / coronal / sagittal overlay of the labels to this PNG."""
    import gzip

    import nibabel as nib

    hu, labels, info = generate_volume(seed, size, n_slices, levels=levels, config=config)
    aff = volume_affine(hu.shape, info["spacing"])

    def nifti(arr: np.ndarray, dtype) -> bytes:
        img = nib.as_closest_canonical(nib.Nifti1Image(arr.transpose(2, 1, 0).astype(dtype), aff))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        img.header.set_xyzt_units("mm")
        return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)

    out_dir = Path(out_dir)
    params = {"generator": "d2ct.data.phantom.generate_volume", "version": PHANTOM_VOLUME_VERSION, "seed": int(seed),
              "size": int(size), "n_slices": int(n_slices), "levels": [float(v) for v in levels]}
    replace = overwrite or (out_dir / "structures.json").is_file()
    with atomic_directory(out_dir, overwrite=replace) as tmp:
        with atomic_write(tmp / "ct.nii.gz", "wb") as f:
            f.write(nifti(np.clip(np.rint(hu), -1024, 3071), np.int16))
        with atomic_write(tmp / "labels.nii.gz", "wb") as f:
            f.write(nifti(labels, np.uint8))
        atomic_write_json(tmp / "structures.json", {
            "params": params, "spacing_mm": list(info["spacing"]), "phase": info["phase"],
            "structures": {str(k): v for k, v in info["structures"].items()}})
    paths = {name: out_dir / name for name in ("ct.nii.gz", "labels.nii.gz", "structures.json")}
    if preview:
        from d2ct.visualization.volume import three_plane_overlay

        paths["preview"] = three_plane_overlay(np.clip(np.rint(hu), -1024, 3071), labels, preview,
                                               spacing=info["spacing"], title=f"3-D phantom, seed {seed}: "
                                               f"{len(info['structures'])} structures (truth)")
    return paths
