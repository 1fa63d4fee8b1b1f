"""The procedural shapes images (`jaxalign.diffusion.shapes`): the reward read from rendered pixels equals the value
computed from the known attributes in closed form, the patch scores average to it, rendering is deterministic and
jittable, and a bad argument is one ValueError."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.diffusion import shapes


def _attributes(shape, colour, size, row=(0,), col=(0,)):
    return {k: jnp.asarray(v, jnp.int32) for k, v in
            {"shape": shape, "colour": colour, "size": size, "row": row, "col": col}.items()}


def test_pixel_areas_are_the_closed_forms():
    combos = list(itertools.product(range(len(shapes.SHAPES)), shapes.SIZES))
    shape, size = np.array(combos).T
    masks = np.asarray(shapes.masks(_attributes(shape, np.zeros_like(shape), size, 16 - size, np.full_like(size, 3))))
    counted = masks.reshape(len(combos), -1).sum(-1)
    np.testing.assert_array_equal(counted[shape == 0], size[shape == 0] ** 2)  # square: k^2
    np.testing.assert_array_equal(counted[shape == 2], size[shape == 2] * (size[shape == 2] + 1) // 2)  # triangle
    np.testing.assert_array_equal(counted, shapes.area(shape, size))  # circle: the row-by-row lattice count
    assert shapes.area([1], [5])[0] == 21 and shapes.area([1], [6])[0] == 32  # by hand: 3+5+5+5+3, 4+6+6+6+6+4


def test_reward_of_rendered_images_equals_the_value_from_their_attributes():
    images, attributes = shapes.sample(jax.random.key(0), 300)
    assert images.shape == (300, 16, 16, 3) and images.dtype == jnp.float32
    assert set(np.unique(np.asarray(images))) <= {-1.0, 1.0}
    np.testing.assert_allclose(shapes.reward(images), shapes.expected_reward(attributes), atol=1e-6)
    np.testing.assert_allclose(shapes.patch_scores(images, 4).mean(-1), shapes.reward(images), atol=1e-6)
    np.testing.assert_allclose(shapes.patch_scores(images, 8).mean(-1), shapes.reward(images), atol=1e-6)
    # every colour, shape and size occurs; the shape lies inside the image with the background around it
    for key, values in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS), ("size", shapes.SIZES)):
        assert len(np.unique(np.asarray(attributes[key]))) == len(values), key
    big_red = shapes.render(_attributes([0], [0], [11], [2], [5]))
    assert float(shapes.reward(big_red)[0]) == pytest.approx(121 / 256)
    patches = np.asarray(shapes.patch_scores(big_red, 4))[0].reshape(4, 4)
    assert patches[0, 0] == 0.0 and patches[1, 2] == 1.0  # a patch outside the square, one inside it


def test_rendering_is_deterministic_and_jittable():
    a, attributes = shapes.sample(jax.random.key(3), 64)
    b, _ = shapes.sample(jax.random.key(3), 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.jit(shapes.render)(attributes), a)
    c, _ = shapes.sample(jax.random.key(4), 64)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("call, message", [
    (lambda: shapes.sample(jax.random.key(0), 0), "n must be a positive integer"),
    (lambda: shapes.render(_attributes([3], [0], [5])), "attribute shape must lie in [0, 2]"),
    (lambda: shapes.render(_attributes([0], [0], [4])), "attribute size must lie in [5, 11]"),
    (lambda: shapes.render(_attributes([0], [0], [8], [9], [0])), "attribute row must lie in [0, 16 - size]"),
    (lambda: shapes.render({"shape": jnp.zeros(2, jnp.int32)}), "attributes must have the keys"),
    (lambda: shapes.reward(jnp.zeros((2, 16, 16))), "images must be [n, 16, 16, 3]"),
    (lambda: shapes.patch_scores(jnp.zeros((2, 16, 16, 3)), 3), "patch must be a positive divisor of 16"),
])
def test_bad_argument_is_one_value_error(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value)
