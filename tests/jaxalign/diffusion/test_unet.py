"""The small image UNet (`jaxalign.diffusion.unet`): output shapes, its matmul convolution against lax's, the time
conditioning, and a few Adam steps of the denoising loss on shapes lower it."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.diffusion import networks, shapes
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.diffusion.unet import Conv, UNet, num_params
from jaxalign.experiments.diffusion_kit.shapes import flat_apply


def test_shapes_and_parameter_count():
    x = jnp.zeros((2, 16, 16, 3))
    for kwargs in ({"channels": 4, "channel_mult": (1, 2, 2)},
                   {"channels": 4, "channel_mult": (1, 2), "attention": True}):
        model = UNet(**kwargs)
        shapes_out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x, jnp.ones(2)), x, 0.5))
        assert shapes_out.shape == (2, 16, 16, 3)
    count = num_params(jax.eval_shape(lambda: UNet(channels=8, groups=4).init(jax.random.key(0), x, jnp.ones(2))))
    assert 10_000 < count < 100_000  # the default base UNet: ~68k parameters


def test_conv_is_lax_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    params = jax.jit(Conv(5).init)(jax.random.key(1), x)
    params = {"params": {"kernel": params["params"]["kernel"], "bias": jnp.full(5, 0.3)}}
    np.testing.assert_allclose(jax.jit(Conv(5).apply)(params, x), jax.jit(nn.Conv(5, (3, 3)).apply)(params, x),
                               atol=1e-5)


def test_time_conditioning_changes_the_output():
    model = UNet(channels=4, channel_mult=(1,))  # one level: the cheapest to compile
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = jax.jit(model.init)(jax.random.key(1), x, jnp.ones(2))
    apply = jax.jit(model.apply)
    assert float(jnp.abs(apply(params, x, jnp.full(2, 0.5))).max()) == 0.0  # zero-initialised output layer (DDPM)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    a, b = apply(params, x, jnp.full(2, 0.1)), apply(params, x, jnp.full(2, 0.9))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_a_few_adam_steps_lower_the_denoising_loss_on_shapes():
    schedule, model = get_schedule("linear"), UNet(channels=4, channel_mult=(1,))
    x0 = shapes.sample(jax.random.key(0), 16)[0].reshape(16, -1)
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)), jnp.ones(1))
    loss = lambda p: networks.denoising_loss(flat_apply(model.apply), p, schedule, x0, jax.random.key(2))  # noqa: E731
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(p, opt_state):
        grads = jax.grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    before, opt_state = float(jax.jit(loss)(params)), optimizer.init(params)
    for _ in range(15):
        params, opt_state = step(params, opt_state)
    assert float(jax.jit(loss)(params)) < 0.8 * before
