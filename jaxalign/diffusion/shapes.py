"""A procedural image set of 16x16 coloured shapes, and a programmatic reward that scores an image from its pixels.

Each image is one shape on a black background, drawn from a PRNG key with every attribute uniform and independent:

- shape: `SHAPES` = square (the k x k box), circle (the pixels of the k x k box whose centre lies within k/2 of the
  box's centre) or triangle (the box's lower-left half, diagonal included: the pixels with column <= row inside
  the box, k (k + 1) / 2 of them);
- colour: one of `PALETTE` (red, green, blue at full saturation), pixel values in [-1, 1] (background -1);
- size k: one of `SIZES` (the box's side in pixels);
- position: the box's top-left corner (row, col), uniform over the positions where the box fits the image.

`render(attributes)` draws them deterministically (jittable, batched: pure jnp on integer attribute arrays),
`sample(key, n)` draws n attribute sets and renders them, returning both.

The reward (`reward`) is the image's red-minus-blue balance,

    r(x) = (1 / HW) sum_{pixels} (clip(R) - clip(B)) / 2,      clip to [-1, 1],

so on a rendered image it is +area / 256 for a red shape, -area / 256 for a blue one and 0 for a green one (the
background's R = B): it prefers LARGE RED shapes and penalises blue ones, which a model can be steered towards
(colour and size are both visible in every pixel), and a base model trained on the uniform mix of colours gets 0 on
average. It reads pixels only, never attributes, so it scores a generated image as it scores a rendered one; the
green channel does not enter, so on generated pixels any colour with R high and B low (orange, yellow) scores as
red does (the palette has no such colour, so on data it is exactly the red-minus-blue area).
`patch_scores` is the same per-pixel score averaged over each `patch` x `patch` patch ([n, patches]; its mean over
patches is `reward` exactly, the patches being equal), the per-patch signal PatchDPO-style weights are built from.

Used by `jaxalign.experiments.diffusion_kit.shapes` (the UNet base model and the preference experiment's shapes
task). Invalid arguments are one ValueError naming the argument and its value.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 16  # image side in pixels
SHAPES = ("square", "circle", "triangle")
PALETTE = np.array([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], np.float32)  # red, green, blue
COLOURS = ("red", "green", "blue")
SIZES = (5, 6, 7, 8, 9, 10, 11)  # the box's side k in pixels
BACKGROUND = -1.0
ATTRIBUTES = ("shape", "colour", "size", "row", "col")
REWARD = "mean over pixels of (clip(R) - clip(B)) / 2: +area/256 for a red shape, -area/256 for a blue one, 0 green"


def _concrete(value):
    """The value as a NumPy array when it is concrete (not traced under jit), else None."""
    try:
        return np.asarray(value)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_attributes(attributes: dict) -> None:
    """One ValueError for missing keys, mismatched shapes or (when concrete) values out of range."""
    missing = [k for k in ATTRIBUTES if k not in attributes]
    if missing:
        raise ValueError(f"attributes must have the keys {ATTRIBUTES}, missing {missing}")
    shapes = {k: jnp.shape(attributes[k]) for k in ATTRIBUTES}
    if len(set(shapes.values())) != 1 or len(shapes["shape"]) != 1:
        raise ValueError(f"attributes must be 1-D arrays of one length [n], got shapes {shapes}")
    values = {k: _concrete(attributes[k]) for k in ATTRIBUTES}
    limits = {"shape": (0, len(SHAPES) - 1), "colour": (0, len(PALETTE) - 1), "size": (min(SIZES), max(SIZES))}
    for key, (low, high) in limits.items():
        v = values[key]
        if v is not None and v.size and (v.min() < low or v.max() > high):
            raise ValueError(f"attribute {key} must lie in [{low}, {high}], got values in [{v.min()}, {v.max()}]")
    if values["size"] is not None:
        for key in ("row", "col"):
            v = values[key]
            if v is not None and v.size and (v.min() < 0 or np.any(v + values["size"] > SIZE)):
                raise ValueError(f"attribute {key} must lie in [0, {SIZE} - size] (the shape inside the image), got "
                                 f"{key}={v.tolist()} with size={values['size'].tolist()}")


def masks(attributes: dict):
    """The shapes' pixel masks [n, 16, 16] (bool) from integer attributes (module docstring's definitions)."""
    k = jnp.asarray(attributes["size"])[:, None, None]
    u = jnp.arange(SIZE)[None, :, None] - jnp.asarray(attributes["row"])[:, None, None]  # row inside the box
    v = jnp.arange(SIZE)[None, None, :] - jnp.asarray(attributes["col"])[:, None, None]  # column inside the box
    box = (u >= 0) & (u < k) & (v >= 0) & (v < k)
    # pixel centres (u + 1/2, v + 1/2) against the box's centre (k/2, k/2); doubled to stay in integers
    du, dv = 2 * u + 1 - k, 2 * v + 1 - k
    circle = du**2 + dv**2 <= k**2
    triangle = v <= u
    shape = jnp.asarray(attributes["shape"])[:, None, None]
    return box & jnp.where(shape == 0, True, jnp.where(shape == 1, circle, triangle))


def render(attributes: dict):
    """Images [n, 16, 16, 3] in [-1, 1] (float32) of integer attributes {shape, colour, size, row, col} ([n] each):
    the shape in its palette colour on a black (-1) background. Deterministic and jittable."""
    check_attributes(attributes)
    return _render({k: attributes[k] for k in ATTRIBUTES})


@jax.jit
def _render(attributes: dict):
    colour = jnp.asarray(PALETTE)[jnp.asarray(attributes["colour"])][:, None, None, :]
    return jnp.where(masks(attributes)[..., None], colour, BACKGROUND).astype(jnp.float32)


def sample_attributes(key, n: int) -> dict:
    """n attribute sets, each attribute uniform and independent (the position uniform over where the box fits)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got n={n!r}")
    return _sample_attributes(key, int(n))


@functools.partial(jax.jit, static_argnums=1)
def _sample_attributes(key, n: int) -> dict:
    k_shape, k_colour, k_size, k_row, k_col = jax.random.split(key, 5)
    size = jnp.asarray(SIZES)[jax.random.randint(k_size, (n,), 0, len(SIZES))]
    room = SIZE - size + 1  # positions where the box fits, per image
    return {"shape": jax.random.randint(k_shape, (n,), 0, len(SHAPES)),
            "colour": jax.random.randint(k_colour, (n,), 0, len(PALETTE)),
            "size": size,
            "row": jnp.floor(jax.random.uniform(k_row, (n,)) * room).astype(jnp.int32),
            "col": jnp.floor(jax.random.uniform(k_col, (n,)) * room).astype(jnp.int32)}


def sample(key, n: int):
    """(images [n, 16, 16, 3], attributes) of n shapes drawn from `key` (module docstring)."""
    attributes = sample_attributes(key, n)
    return render(attributes), attributes


def _check_images(images, what: str = "images"):
    shape = jnp.shape(images)
    if len(shape) != 4 or shape[1:] != (SIZE, SIZE, 3) or shape[0] < 1:
        raise ValueError(f"{what} must be [n, {SIZE}, {SIZE}, 3] with n >= 1, got shape {shape}")


def pixel_scores(images):
    """The reward's per-pixel score (clip(R) - clip(B)) / 2 in [-1, 1]: [n, 16, 16]."""
    _check_images(images)
    clipped = jnp.clip(images, -1.0, 1.0)
    return 0.5 * (clipped[..., 0] - clipped[..., 2])


def reward(images):
    """The programmatic reward r(x) of images [n, 16, 16, 3]: [n] (module docstring)."""
    _check_images(images)
    return _reward(images)


@jax.jit
def _reward(images):
    return jnp.mean(pixel_scores(images), axis=(1, 2))


def patch_scores(images, patch: int = 4):
    """The per-pixel score averaged over each `patch` x `patch` patch, row-major: [n, (16 / patch)^2]."""
    if not isinstance(patch, (int, np.integer)) or isinstance(patch, bool) or patch < 1 or SIZE % patch:
        raise ValueError(f"patch must be a positive divisor of {SIZE}, got patch={patch!r}")
    s = pixel_scores(images)
    g = SIZE // patch
    return s.reshape(s.shape[0], g, patch, g, patch).mean(axis=(2, 4)).reshape(s.shape[0], g * g)


def patch_means(values, patch: int = 4):
    """The mean over each patch's pixels (and channels) of per-element values [n, 16, 16, C]: [n, (16 / patch)^2],
    patches row-major as in `patch_scores` (the per-patch denoising error of PatchDPO-style objectives)."""
    if not isinstance(patch, (int, np.integer)) or isinstance(patch, bool) or patch < 1 or SIZE % patch:
        raise ValueError(f"patch must be a positive divisor of {SIZE}, got patch={patch!r}")
    n, g = values.shape[0], SIZE // patch
    return values.reshape(n, g, patch, g, patch, -1).mean(axis=(2, 4, 5)).reshape(n, g * g)


def expected_reward(attributes: dict) -> np.ndarray:
    """The reward a rendered image has, from its attributes alone: +-area / 256 (red / blue), 0 (green), with the
    shape's pixel area in closed form (`area`). NumPy, [n]."""
    sign = np.array([1.0, 0.0, -1.0])[np.asarray(attributes["colour"])]
    return sign * area(attributes["shape"], attributes["size"]) / SIZE**2


def area(shape, size) -> np.ndarray:
    """Pixel area of a shape of box side k: k^2 (square), k (k + 1) / 2 (triangle), and for the circle the lattice
    count by rows: row u's pixel centres lie at offsets m = j + 1/2 - k/2 from the centre (integers for odd k,
    half-integers for even k), and |m| <= w_u = sqrt((k/2)^2 - (u + 1/2 - k/2)^2) holds for 2 floor(w_u) + 1 of
    them (odd k) or 2 floor(w_u + 1/2) (even k)."""
    shape, size = np.asarray(shape), np.asarray(size)
    out = np.empty(shape.shape, np.float64)
    for i, (s, k) in enumerate(zip(shape.ravel(), size.ravel())):
        if s == 0:
            out.flat[i] = k * k
        elif s == 2:
            out.flat[i] = k * (k + 1) / 2
        else:
            dy = np.arange(k) + 0.5 - k / 2
            w = np.sqrt(np.maximum((k / 2) ** 2 - dy**2, 0.0))
            out.flat[i] = np.sum(2 * np.floor(w) + 1 if k % 2 else 2 * np.floor(w + 0.5))
    return out


__all__ = ["ATTRIBUTES", "BACKGROUND", "COLOURS", "PALETTE", "REWARD", "SHAPES", "SIZE", "SIZES", "area",
           "check_attributes", "expected_reward", "masks", "patch_means", "patch_scores", "pixel_scores", "render",
           "reward", "sample", "sample_attributes"]
