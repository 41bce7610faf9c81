"""Photometric image augmentation: a hand-made day-to-night *simulation* and mild day jitter.

The seed method (segmentation + attention on Patch-NetVLAD; README, "The seed method") trains with night images made from day images by a
day-to-night GAN (AU-GAN). We do not have that GAN. :func:`simulate_night` is a **photometric
simulation**, not a GAN and not a learned model: it changes how the same scene is lit and
recorded (exposure, tone curve, light colour, light sources, optics, sensor noise) but it
cannot add what a GAN may hallucinate (lit windows, headlights on cars, changed sky texture).
Treat results trained on it as "trained with simulated night", never as the seed's setting.

Pipeline of :func:`simulate_night`, in physical order (scene light -> optics -> sensor ->
encoding); each step is its own function with its parameter ranges documented there:

1. :func:`darken` -- exposure and tone curve on encoded (sRGB-like) values in [0, 1];
2. conversion to linear light (``x ** 2.2``), where light adds and gains multiply;
3. :func:`color_temperature` -- white-balance shift toward sodium-vapour orange or toward blue;
4. :func:`add_glare` -- a few street-light blobs, then bloom around every bright pixel;
5. :func:`blur` -- slight defocus (Gaussian) and motion blur (line kernel);
6. :func:`sensor_noise` -- shot + read noise in linear light; after encoding the noise is
   stronger in the dark (the encoding curve's slope is steepest near black);
7. encoding (``x ** (1 / 2.2)``), clip, round to ``uint8``.

``strength`` scales every step: 0 is (up to rounding) the identity, 1 the documented ranges,
values above 1 go further. Multiplicative parameters are interpolated geometrically
(``value ** strength``), additive ones linearly.

Determinism: every random number comes from the ``numpy.random.Generator`` passed in, drawn in
a fixed order, so the same input and the same seed give the same output bit for bit.
Dependencies: numpy and Pillow only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from vpr_localizer.io.image_files import validate_rgb

#: Encoding exponent used to go between encoded values and linear light (sRGB ~ 2.2).
ENCODING_GAMMA = 2.2

#: :func:`darken` ranges at strength 1: exposure factor and tone-curve exponent.
EXPOSURE_RANGE = (0.25, 0.45)
TONE_GAMMA_RANGE = (1.5, 2.2)
#: :func:`color_temperature` ranges at strength 1 (per-channel linear gains R, G, B).
SODIUM_GAINS = ((1.15, 1.35), (0.95, 1.05), (0.50, 0.70))
BLUE_GAINS = ((0.65, 0.80), (0.90, 1.00), (1.15, 1.35))
#: Probability that :func:`color_temperature` picks sodium when ``light`` is None.
SODIUM_PROBABILITY = 0.7
#: :func:`color_temperature` desaturation fraction range (low light loses colour).
DESATURATION_RANGE = (0.0, 0.3)
#: :func:`add_glare`: number of light sources, core radius (fraction of min(H, W)), peak.
GLARE_COUNT_RANGE = (1, 4)
GLARE_RADIUS_RANGE = (0.006, 0.02)
GLARE_PEAK_RANGE = (2.0, 6.0)
#: :func:`add_glare` bloom: threshold (linear), gain, sigma (fraction of min(H, W)).
BLOOM_THRESHOLD = 0.6
BLOOM_GAIN_RANGE = (0.3, 0.8)
BLOOM_SIGMA_RANGE = (0.01, 0.03)
#: :func:`blur`: defocus sigma and motion length, in pixels per 480 px of min(H, W).
DEFOCUS_SIGMA_RANGE = (0.3, 1.2)
MOTION_LENGTH_RANGE = (0.0, 5.0)
#: :func:`sensor_noise`: shot-noise variance per unit linear signal, read-noise std (linear).
SHOT_NOISE_RANGE = (0.001, 0.004)
READ_NOISE_RANGE = (0.002, 0.005)

#: :func:`random_photometric` ranges (mild day jitter).
PHOTO_BRIGHTNESS_RANGE = (0.8, 1.2)
PHOTO_CONTRAST_RANGE = (0.8, 1.2)
PHOTO_SATURATION_RANGE = (0.8, 1.2)
PHOTO_GAMMA_RANGE = (0.85, 1.15)
PHOTO_WB_RANGE = (0.95, 1.05)

#: ITU-R BT.601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --- helpers -------------------------------------------------------------------------------------

def _check_args(rng: np.random.Generator, strength: float) -> float:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    s = float(strength)
    if not np.isfinite(s) or s < 0:
        raise ValueError(f"strength must be finite and >= 0, got {strength}")
    return s


def _uniform(rng: np.random.Generator, lo_hi: Tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def to_float(rgb: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` -> ``float32`` encoded values in [0, 1]."""
    return rgb.astype(np.float32) / 255.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """``float`` encoded values -> ``uint8`` (clip to [0, 1], round half to even)."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_linear(x: np.ndarray) -> np.ndarray:
    """Encoded values in [0, 1] -> linear light, ``x ** 2.2`` (float32)."""
    return np.power(np.clip(x, 0.0, None), ENCODING_GAMMA, dtype=np.float32)


def to_encoded(lin: np.ndarray) -> np.ndarray:
    """Linear light -> encoded values, ``lin ** (1 / 2.2)`` (negative values -> 0; not clipped above)."""
    return np.power(np.clip(lin, 0.0, None), 1.0 / ENCODING_GAMMA, dtype=np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float ``(H, W)`` or ``(H, W, C)`` array, edge padding.

    Kernel radius ``ceil(3 sigma)``; sigma <= 0.05 returns a copy.
    """
    x = np.asarray(x, dtype=np.float32)
    if sigma <= 0.05:
        return x.copy()
    r = int(np.ceil(3.0 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = x
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def _resize_float(x: np.ndarray, size_wh: Tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float ``(H, W, C)`` array channel by channel with Pillow (mode ``F``)."""
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], dtype=np.float32), mode="F")
                        .resize(size_wh, resample), dtype=np.float32) for c in range(x.shape[2])]
    return np.stack(chans, axis=-1)


# --- the steps of simulate_night -----------------------------------------------------------------

def darken(x: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Exposure drop and tone curve: ``y = e * x ** g`` on encoded values.

    ``e`` (exposure factor) ~ U(0.25, 0.45) and ``g`` (tone-curve exponent) ~ U(1.5, 2.2) at
    strength 1; applied as ``e ** strength`` and ``1 + strength * (g - 1)``. ``g > 1`` crushes
    shadows and mid-tones more than highlights, as unlit parts of a night scene go black while
    lit parts stay visible. On a typical day image (mean ~0.45) the mean drops to ~0.1.

    Args:
        x: ``float32 (H, W, 3)`` encoded values in [0, 1].
        rng: random generator (2 draws).
        strength: >= 0.

    Returns:
        ``float32 (H, W, 3)`` in [0, 1].
    """
    e = _uniform(rng, EXPOSURE_RANGE) ** strength
    g = 1.0 + strength * (_uniform(rng, TONE_GAMMA_RANGE) - 1.0)
    return (e * np.power(np.clip(x, 0.0, 1.0), g)).astype(np.float32)


def color_temperature(lin: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                      light: Optional[str] = None) -> Tuple[np.ndarray, str]:
    """Night light colour: desaturate, then per-channel white-balance gains in linear light.

    * ``sodium`` (low/high-pressure sodium street lights): gains R ~ U(1.15, 1.35),
      G ~ U(0.95, 1.05), B ~ U(0.50, 0.70) -- the R/B ratio **rises**;
    * ``blue`` (moonlight / LED / blue hour as a camera records it): R ~ U(0.65, 0.80),
      G ~ U(0.90, 1.00), B ~ U(1.15, 1.35) -- the R/B ratio **falls**;
    * desaturation toward luma by a fraction ~ U(0, 0.3) first (low light loses colour).

    With ``light=None`` sodium is chosen with probability 0.7, else blue. Gains are applied as
    ``gain ** strength``, the desaturation as ``strength * fraction`` (capped at 1).

    Args:
        lin: ``float32 (H, W, 3)`` linear light.
        rng: random generator (1 draw for the choice, then 4).
        strength: >= 0.
        light: ``"sodium"``, ``"blue"`` or None (random).

    Returns:
        ``(float32 (H, W, 3) linear, light used)``.

    Raises:
        ValueError: unknown ``light``.
    """
    if light not in (None, "sodium", "blue"):
        raise ValueError(f"light must be 'sodium', 'blue' or None, got {light!r}")
    pick = float(rng.uniform())
    if light is None:
        light = "sodium" if pick < SODIUM_PROBABILITY else "blue"
    ranges = SODIUM_GAINS if light == "sodium" else BLUE_GAINS
    gains = np.array([_uniform(rng, r) for r in ranges], dtype=np.float32) ** np.float32(strength)
    desat = min(1.0, strength * _uniform(rng, DESATURATION_RANGE))
    luma = (lin @ _LUMA)[..., None]
    out = (1.0 - desat) * lin + desat * luma
    return (out * gains).astype(np.float32), light


def add_glare(lin: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
              light: str = "sodium", num_lights: Optional[int] = None) -> np.ndarray:
    """Street-light glare: a few radial light blobs, then bloom around all bright pixels.

    Light sources: ``n = round(strength * U{1..4})`` blobs, centres uniform over the upper
    two thirds of the image (lamps are above the road), each ``I(d) = P * exp(-(d/r)^2) +
    0.05 P / (1 + (d / 3r)^2)`` (bright core plus a long halo) with core radius
    ``r ~ U(0.006, 0.02) * min(H, W)`` and peak ``P ~ U(2, 6)`` (linear; > 1, i.e. saturating).
    Colour: warm ``(1.0, 0.75, 0.45)`` for sodium, cool white ``(0.85, 0.92, 1.0)`` for blue.

    Bloom (light scattered in the lens): everything above ``0.6`` (linear) is blurred with
    ``sigma ~ U(0.01, 0.03) * min(H, W)`` and added back with gain ``~ U(0.3, 0.8) * strength``;
    computed at 1/4 resolution (it is low-frequency) and upsampled bilinearly.

    Args:
        lin: ``float32 (H, W, 3)`` linear light.
        rng: random generator (1 + 4 per blob + 2 draws).
        strength: >= 0; 0 returns the input unchanged.
        light: ``"sodium"`` or ``"blue"``, the colour of the lamps.
        num_lights: number of blobs; None draws it as above (the draw happens either way, so
            the rest of the random stream does not depend on this argument).

    Returns:
        ``float32 (H, W, 3)`` linear light (may exceed 1; clipped at encoding).
    """
    h, w = lin.shape[:2]
    m = min(h, w)
    out = lin.astype(np.float32, copy=True)
    n = int(round(strength * int(rng.integers(GLARE_COUNT_RANGE[0], GLARE_COUNT_RANGE[1] + 1))))
    if num_lights is not None:
        if int(num_lights) < 0:
            raise ValueError(f"num_lights must be >= 0, got {num_lights}")
        n = int(num_lights)
    colour = np.array((1.0, 0.75, 0.45) if light == "sodium" else (0.85, 0.92, 1.0), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(n):
        cy = float(rng.uniform(0.0, 2.0 / 3.0)) * (h - 1)
        cx = float(rng.uniform(0.0, 1.0)) * (w - 1)
        r = max(1.0, _uniform(rng, GLARE_RADIUS_RANGE) * m)
        peak = _uniform(rng, GLARE_PEAK_RANGE)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        blob = peak * np.exp(-(d / r) ** 2) + 0.05 * peak / (1.0 + (d / (3.0 * r)) ** 2)
        out += blob[..., None] * colour
    sigma = _uniform(rng, BLOOM_SIGMA_RANGE) * m
    gain = _uniform(rng, BLOOM_GAIN_RANGE) * strength
    if gain > 0:
        bright = np.clip(out - BLOOM_THRESHOLD, 0.0, None)
        if bright.any():
            f = 4
            small = _resize_float(bright, (max(1, w // f), max(1, h // f)), Image.BOX)
            small = gaussian_blur(small, sigma / f)
            out += gain * _resize_float(small, (w, h), Image.BILINEAR)
    return out


def blur(lin: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Slight defocus and motion blur (long night exposures, focus hunting in the dark).

    Defocus: Gaussian, ``sigma ~ U(0.3, 1.2)`` px; motion: a line kernel (mean of shifted
    copies, edge padding) of length ``~ U(0, 5)`` px at a uniform random angle. Both scale with
    ``strength`` and with ``min(H, W) / 480`` (the ranges are for a 480-px-high image).

    Args:
        lin: ``float32 (H, W, 3)``.
        rng: random generator (3 draws).
        strength: >= 0; 0 returns a copy.

    Returns:
        ``float32 (H, W, 3)``.
    """
    scale = strength * min(lin.shape[:2]) / 480.0
    sigma = _uniform(rng, DEFOCUS_SIGMA_RANGE) * scale
    length = _uniform(rng, MOTION_LENGTH_RANGE) * scale
    angle = float(rng.uniform(0.0, np.pi))
    out = gaussian_blur(lin, sigma)
    n = int(round(length))
    if n >= 1:
        h, w = out.shape[:2]
        p = np.pad(out, ((n, n), (n, n), (0, 0)), mode="edge")
        acc = np.zeros_like(out)
        steps = np.linspace(-length / 2.0, length / 2.0, n + 1)
        for t in steps:
            dy = int(round(t * np.sin(angle)))
            dx = int(round(t * np.cos(angle)))
            acc += p[n + dy:n + dy + h, n + dx:n + dx + w]
        out = acc / len(steps)
    return out.astype(np.float32)


def sensor_noise(lin: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Shot + read noise in linear light, independent per pixel and channel.

    ``lin' = lin + N(0, k * lin + s_r^2)`` with shot coefficient ``k ~ U(0.001, 0.004)``
    (variance per unit signal; Poisson photon noise) and read-noise std ``s_r ~ U(0.002,
    0.005)``, both times ``strength`` (k linearly, s_r linearly), clipped at 0. After encoding
    (``lin ** (1/2.2)``, slope ``~ lin ** -0.55``) the noise is much stronger in dark regions
    than in bright ones, as in a night photograph pushed to high gain.

    Args:
        lin: ``float32 (H, W, 3)`` linear light, >= 0.
        rng: random generator (2 draws + one normal per value).
        strength: >= 0.

    Returns:
        ``float32 (H, W, 3)`` linear light, >= 0.
    """
    k = _uniform(rng, SHOT_NOISE_RANGE) * strength
    s_r = _uniform(rng, READ_NOISE_RANGE) * strength
    std = np.sqrt(k * np.clip(lin, 0.0, None) + s_r ** 2).astype(np.float32)
    noise = rng.standard_normal(lin.shape, dtype=np.float32)
    return np.clip(lin + std * noise, 0.0, None).astype(np.float32)


def simulate_night(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                   light: Optional[str] = None) -> np.ndarray:
    """Photometric day-to-night simulation (not a GAN; see the module docstring).

    Steps: :func:`darken` -> linear -> :func:`color_temperature` -> :func:`add_glare` ->
    :func:`blur` -> :func:`sensor_noise` -> encode -> ``uint8``.

    Args:
        rgb: ``uint8 (H, W, 3)`` RGB day image.
        rng: ``numpy.random.Generator``; same seed and input -> same output.
        strength: >= 0; 0 ~ identity (within one grey level), 1 the documented ranges.
        light: ``"sodium"``, ``"blue"`` or None (random, 70% sodium).

    Returns:
        ``uint8 (H, W, 3)`` RGB.

    Raises:
        ImageLoadError: not a non-empty uint8 (H, W, 3) image. ValueError: bad strength or light.
        TypeError: ``rng`` is not a Generator.
    """
    validate_rgb(rgb)
    s = _check_args(rng, strength)
    x = darken(to_float(rgb), rng, s)
    lin = to_linear(x)
    lin, light_used = color_temperature(lin, rng, s, light)
    lin = add_glare(lin, rng, s, light_used)
    lin = blur(lin, rng, s)
    lin = sensor_noise(lin, rng, s)
    return to_uint8(to_encoded(lin))


# --- day augmentation ----------------------------------------------------------------------------

def random_photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild photometric jitter for day images (no geometry change).

    In this order, on encoded values in [0, 1]: per-channel white-balance gain ~ U(0.95, 1.05);
    saturation factor ~ U(0.8, 1.2) (blend with luma); contrast factor ~ U(0.8, 1.2) around
    the image mean luma; brightness factor ~ U(0.8, 1.2); tone exponent ~ U(0.85, 1.15)
    (``x ** g``); clip, round.

    Args:
        rgb: ``uint8 (H, W, 3)`` RGB.
        rng: ``numpy.random.Generator`` (7 draws); deterministic for a given seed.

    Returns:
        ``uint8 (H, W, 3)`` RGB.

    Raises:
        ValueError: bad image. TypeError: ``rng`` is not a Generator.
    """
    validate_rgb(rgb)
    _check_args(rng, 1.0)
    x = to_float(rgb)
    wb = np.array([_uniform(rng, PHOTO_WB_RANGE) for _ in range(3)], np.float32)
    sat = _uniform(rng, PHOTO_SATURATION_RANGE)
    con = _uniform(rng, PHOTO_CONTRAST_RANGE)
    bri = _uniform(rng, PHOTO_BRIGHTNESS_RANGE)
    g = _uniform(rng, PHOTO_GAMMA_RANGE)
    x = x * wb
    luma = (x @ _LUMA)[..., None]
    x = luma + sat * (x - luma)
    mean = float((x @ _LUMA).mean())
    x = mean + con * (x - mean)
    x = np.clip(x * bri, 0.0, 1.0)
    return to_uint8(np.power(x, g))
