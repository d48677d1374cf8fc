"""Procedurally generated natural-like scenes with object masks: the pretraining corpus of the small SAM.

SAM's ViT-B weights cannot be downloaded on every machine, and DB-SAM's premise is a *pretrained*,
frozen ViT. The project therefore pretrains a small SAM itself, on scenes that share what makes
natural images hard for box-prompted segmentation, and contain no medical data:

- textured backgrounds (smooth noise at several scales, gradients);
- overlapping objects of many sizes (1-60 % of the image), shapes (blobs, polygons, ellipses, rings,
  thin bars) and contrasts (from a few grey levels to full range), each with its own texture;
- occlusion: an object's mask is what stays visible after later objects are drawn over it, so masks
  are often non-convex and a box is often a poor answer;
- blur, sensor noise, and grey or colour images.

A scene is a function of its seed alone (``numpy.random.default_rng(seed)``), so a training run and a
held-out evaluation set are reproducible on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MIN_OBJECT_PIXELS = 24  # at 128 px; smaller visible remnants are not offered as targets


@dataclass
class Scene:
    """One generated image and the visible masks of its objects (back to front)."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # (H, W) uint8 0/1 each, non-empty, at least MIN_OBJECT_PIXELS scaled to the size


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in [0, 1] that varies over about ``size / cells`` pixels: a random grid upsampled bicubically."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    noise = np.asarray(image)
    low, high = noise.min(), noise.max()
    return (noise - low) / max(high - low, 1e-6)


def _texture(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A zero-mean texture in about [-1, 1]: smooth noise, stripes, or a mixture of scales."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return 2 * _smooth_noise(rng, size, int(rng.integers(2, 12))) - 1
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 24)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        return np.sin(phase + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    if kind == 2:
        fine = 2 * _smooth_noise(rng, size, int(rng.integers(16, 48))) - 1
        coarse = 2 * _smooth_noise(rng, size, int(rng.integers(2, 6))) - 1
        return 0.5 * fine + 0.5 * coarse
    return np.zeros((size, size), np.float32)  # flat


def _star_shape(rng: np.random.Generator, yy, xx, cy, cx, radius, roughness) -> np.ndarray:
    """A star-convex blob: radius as a random low-order Fourier series of the angle."""
    dy, dx = yy - cy, xx - cx
    angle = np.arctan2(dy, dx)
    r = np.ones_like(angle)
    for harmonic in range(1, 6):
        amplitude = roughness * rng.uniform(0, 1) / harmonic
        r += amplitude * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * np.clip(r, 0.2, None)


def _ellipse(rng, yy, xx, cy, cx, radius) -> tuple[np.ndarray, np.ndarray]:
    """Rotated-ellipse distance (1 on the boundary) for an ellipse of the given mean radius."""
    ratio = rng.uniform(0.25, 1.0)
    a, b = radius / np.sqrt(ratio), radius * np.sqrt(ratio)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2, theta


def _shape(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A boolean shape of random kind, position and size (its mean radius from 2 % to 45 % of the image)."""
    radius = size * np.exp(rng.uniform(np.log(0.035), np.log(0.4)))
    cy, cx = rng.uniform(-0.1, 1.1, size=2) * size
    kind = rng.choice(["blob", "blob", "ellipse", "ring", "polygon", "bar", "noise"])
    if kind == "blob":
        return _star_shape(rng, yy, xx, cy, cx, radius, rng.uniform(0.1, 0.8))
    if kind == "ellipse":
        return _ellipse(rng, yy, xx, cy, cx, radius)[0] <= 1
    if kind == "ring":
        distance, _ = _ellipse(rng, yy, xx, cy, cx, radius)
        inner = rng.uniform(0.3, 0.8) ** 2
        ring = (distance <= 1) & (distance >= inner)
        if rng.random() < 0.5:  # an open ring (C shape)
            angle = np.arctan2(yy - cy, xx - cx)
            start = rng.uniform(-np.pi, np.pi)
            ring &= np.cos(angle - start) < rng.uniform(0.0, 0.8)
        return ring
    if kind == "polygon":
        corners = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.5, 1.4, corners)
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        canvas = Image.new("L", (size, size))
        ImageDraw.Draw(canvas).polygon(points, fill=1)
        return np.asarray(canvas, dtype=bool)
    if kind == "bar":  # thin, long, any angle: the box is a poor answer
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        width = max(1.5, radius * rng.uniform(0.08, 0.3))
        bend = rng.uniform(-1, 1) / max(radius, 1.0)
        return (np.abs(u) <= 1.5 * radius) & (np.abs(v - bend * u**2) <= width)
    # thresholded smooth noise inside a disc: irregular, sometimes several pieces
    noise = _smooth_noise(rng, size, int(rng.integers(3, 10)))
    disc = np.hypot(yy - cy, xx - cx) <= radius * 1.3
    return disc & (noise > rng.uniform(0.45, 0.65))


def _colour(rng: np.random.Generator, grey: bool) -> np.ndarray:
    value = rng.uniform(0, 255)
    if grey:
        return np.full(3, value, np.float32)
    return np.clip(value + rng.normal(0, 60, 3), 0, 255).astype(np.float32)


def generate_scene(seed: int, size: int = 128, max_objects: int = 10) -> Scene:
    """The scene of ``seed``: a textured background with 2 to ``max_objects`` overlapping textured objects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grey = rng.random() < 0.7  # medical images are mostly grey; some colour keeps the ViT general
    background = _colour(rng, grey)[None, None] + rng.uniform(10, 80) * _texture(rng, size, yy, xx)[..., None]
    gradient = rng.uniform(-60, 60) * ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size)
    canvas = background + gradient[..., None]
    owner = np.full((size, size), -1, np.int16)
    count = int(rng.integers(2, max_objects + 1))
    for index in range(count):
        shape = _shape(rng, size, yy, xx)
        if not shape.any():
            continue
        base = _colour(rng, grey)
        # contrast to what lies under the object: from barely visible to strong
        under = canvas[shape].mean(0)
        contrast = rng.choice([-1, 1]) * np.exp(rng.uniform(np.log(8), np.log(160)))
        if rng.random() < 0.6:
            base = np.clip(under + contrast, 0, 255)
        amplitude = rng.uniform(0, 50)
        pattern = _texture(rng, size, yy, xx)
        shading = rng.uniform(-30, 30) * ((xx - xx[shape].mean()) * rng.uniform(-1, 1)) / size
        fill = base[None, None] + (amplitude * pattern + shading)[..., None]
        canvas[shape] = fill[shape]
        owner[shape] = index
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    blur = rng.uniform(0, 1.2)
    if blur > 0.3:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    noise = rng.normal(0, rng.uniform(0, 10), image.shape[:2])[..., None]
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    if grey:
        image = np.repeat(image[..., :1], 3, axis=2)
    min_pixels = max(4, round(MIN_OBJECT_PIXELS * (size / 128) ** 2))
    masks = [(owner == index).astype(np.uint8) for index in range(count)]
    return Scene(np.ascontiguousarray(image), [mask for mask in masks if mask.sum() >= min_pixels])


__all__ = ["MIN_OBJECT_PIXELS", "Scene", "generate_scene"]
