"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), functionally.

LoRA freezes a pre-trained weight W0 and learns a low-rank update: h = x W0 + (alpha / r) x A B (Hu et al. 2021,
eq. 3, written for our row-vector convention `x @ W`), with A: [in, r] drawn at random, B: [r, out] initialised to
zero, so that training starts exactly at the base model (sec. 4.1), and alpha / r the scale of sec. 4.1.

Here LoRA is a transformation of the parameter tree, not of the model code: `apply_lora(base, adapters, cfg)`
returns ordinary parameters with W = W0 + (alpha / r) A B at every targeted kernel, and `DecoderLM.apply` runs on
them unchanged. The same function merges the adapters for export (`merge_lora`): the merged tree is a plain
parameter tree with no trace of LoRA, exactly what sec. 4.1 calls "no additional inference latency".

Kernels may be multi-dimensional (the attention's q/k/v are [embed, heads, head_dim], o is [heads, head_dim,
embed]; under `scan_layers` every kernel has a leading "layers" axis). The kernel's logical axis names split it
into input and output axes: leading "layers" axes are a stack of independent layers (each gets its own A and B);
"embed" is the input when it comes first (q/k/v, gate/up, lm_head, the value head) and the output when it comes
last (o, down, the embedding table); a plain 2-D kernel is [in, out]. A keeps the input axes unflattened
([*stack, *in, r]) and B the output axes ([*stack, r, *out]), so A and B carry the base kernel's logical axis
names and shard like it, with the rank axis replicated.

The adapter tree mirrors the parameter tree down to each targeted leaf, where it holds {"a": A, "b": B}, e.g.
``{"layer_0": {"attn": {"q": {"kernel": {"a": ..., "b": ...}}}}}``.

LoRA's dropout on the adapter input (Hu et al. 2021 use it in some experiments) cannot be expressed as a change of
weights and is not provided.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STACK_AXES = ("layers",)  # logical names of leading axes that stack independent layers (nn.scan)
MODEL_AXIS = "embed"  # the model dimension: the input axis when first, the output axis when last
RANK_AXIS = None  # logical name of the rank axis of A and B: None = replicated on every mesh


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters and their size: rank r, scale alpha / r (Hu et al. 2021, sec. 4.1).

    `targets` are regular expressions matched against parameter paths such as "layer_0/attn/q/kernel" on whole
    path segments: "attn/q" matches the q projection of every layer, "attn/(q|v)" q and v, "mlp/.*" every MLP
    kernel, "layer_1/attn/o" one layer's output projection. Every pattern must match at least one kernel.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn/q", "attn/v")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)) or not self.targets:
            raise ValueError(f"lora.targets must be a non-empty tuple of path patterns such as ('attn/q', 'attn/v'), "
                             f"got {self.targets!r}")
        for pattern in self.targets:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"lora.targets must hold non-empty strings, got {pattern!r} in {self.targets!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lora.targets pattern {pattern!r} is not a valid regular expression: {e}") from None
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """alpha / r, the factor on A B (Hu et al. 2021, sec. 4.1)."""
        return float(self.alpha) / self.rank


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params: Any) -> dict[str, Any]:
    """{"layer_0/attn/q/kernel": leaf} for a (boxed, abstract or plain) parameter tree; boxed leaves stay boxed."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _names(leaf: Any) -> tuple | None:
    return tuple(leaf.names) if _is_boxed(leaf) else None


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (leaf.value.shape if _is_boxed(leaf) else leaf.shape))


def _stack_count(names: tuple | None) -> int:
    count = 0
    while names is not None and count < len(names) and names[count] in STACK_AXES:
        count += 1
    return count


def adaptable(leaf: Any) -> bool:
    """Whether a leaf can carry an adapter: at least two axes besides stacked-layer axes (kernels, embeddings)."""
    return len(_shape(leaf)) - _stack_count(_names(leaf)) >= 2


def split_axes(path: str, leaf: Any) -> tuple[int, int, int]:
    """(stacked, input, output) axis counts of a kernel, from its logical axis names (module docstring).

    A plain (unboxed) leaf carries no names, so only a 2-D one can be split ([in, out]); a multi-dimensional one is
    one clear error asking for the boxed parameters."""
    shape, names = _shape(leaf), _names(leaf)
    stack = _stack_count(names)
    rest = len(shape) - stack
    if rest < 2:
        raise ValueError(f"parameter {path} of shape {shape} has fewer than 2 axes (besides stacked layers): LoRA "
                         f"adapts matrices only")
    if names is None:
        if rest == 2:
            return 0, 1, 1
        raise ValueError(f"parameter {path} has shape {shape} but no logical axis names, so its input and output "
                         f"axes are unknown: pass the boxed parameters (`init_params(cfg, key)` or "
                         f"`jax.eval_shape` of it) to init_lora")
    own = names[stack:]
    if own[0] == MODEL_AXIS:
        return stack, 1, rest - 1
    if own[-1] == MODEL_AXIS:
        return stack, rest - 1, 1
    if rest == 2:
        return stack, 1, 1
    raise ValueError(f"parameter {path} has logical axes {names}: cannot tell input from output axes (expected "
                     f"{MODEL_AXIS!r} first or last, or a 2-D kernel)")


def target_paths(params: Any, cfg: LoraConfig) -> list[str]:
    """The paths of the kernels `cfg.targets` select, in tree order; one clear error for a pattern matching none,
    listing every kernel that can carry an adapter."""
    candidates = [path for path, leaf in param_paths(params).items() if adaptable(leaf)]
    chosen = set()
    for pattern in cfg.targets:
        regex = re.compile(rf"(?:^|/)(?:{pattern})(?:/|$)")
        hits = [path for path in candidates if regex.search(path)]
        if not hits:
            raise ValueError(f"lora.targets pattern {pattern!r} matches no parameter that can carry an adapter; "
                             f"available: {', '.join(candidates)}")
        chosen.update(hits)
    return [path for path in candidates if path in chosen]


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def init_lora(base_params: Any, cfg: LoraConfig, rng: jax.Array) -> dict:
    """Adapters {"a", "b"} for every targeted kernel of `base_params` (Hu et al. 2021, sec. 4.1).

    A ~ N(0, 1/fan_in) with fan_in the product of the kernel's input axes, B = 0, so `apply_lora` returns the base
    parameters exactly until B moves. `base_params` may be boxed (as `init_params` returns them), abstract
    (`jax.eval_shape` of that; only shapes and axis names are read) or plain (2-D targets only). Boxed input gives
    boxed output: A carries the kernel's (stack, input) axis names plus the replicated rank axis, B (stack, rank,
    output), so `jaxalign.sharding.logical_shardings` shards them consistently with the base.
    """
    leaves = param_paths(base_params)
    splits = {path: split_axes(path, leaves[path]) for path in target_paths(base_params, cfg)}  # errors first
    keys = jax.random.split(rng, len(splits))
    flat = {}
    for key, (path, (stack, n_in, _)) in zip(keys, splits.items()):
        leaf = leaves[path]
        shape = _shape(leaf)
        stack_shape, in_shape, out_shape = shape[:stack], shape[stack:stack + n_in], shape[stack + n_in:]
        dtype = (leaf.value if _is_boxed(leaf) else leaf).dtype
        a = jax.random.normal(key, stack_shape + in_shape + (cfg.rank,), jnp.float32)
        a = (a * math.prod(in_shape) ** -0.5).astype(dtype)
        b = jnp.zeros(stack_shape + (cfg.rank,) + out_shape, dtype)
        if _is_boxed(leaf):
            names = leaf.names
            a = nn.LogicallyPartitioned(a, tuple(names[:stack + n_in]) + (RANK_AXIS,))
            b = nn.LogicallyPartitioned(b, tuple(names[:stack]) + (RANK_AXIS,) + tuple(names[stack + n_in:]))
        flat[path] = {"a": a, "b": b}
    return _nest(flat)


def _is_adapter(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def adapter_paths(adapters: Any) -> list[str]:
    """The parameter paths an adapter tree adapts, e.g. ["layer_0/attn/q/kernel", ...]."""
    found = []

    def walk(node, prefix):
        if _is_adapter(node):
            found.append(prefix)
        elif isinstance(node, dict):
            for key, sub in node.items():
                walk(sub, f"{prefix}/{key}" if prefix else str(key))
        else:
            raise ValueError(f"adapter tree has a leaf at {prefix or '<root>'} outside an {{'a', 'b'}} pair; "
                             f"expected the tree init_lora returns")

    walk(adapters, "")
    return found


def lora_delta(a: jax.Array, b: jax.Array, stack: int = 0) -> jax.Array:
    """A B contracted over the rank axis: [*stack, *in, r] x [*stack, r, *out] -> [*stack, *in, *out], the first
    `stack` axes batched (one pair per stacked layer). Full fp32 precision: merging is exact up to rounding on every
    backend (TPUs otherwise multiply fp32 in bf16 passes)."""
    product = lambda x, y: jnp.tensordot(x, y, axes=1, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    for _ in range(stack):
        product = jax.vmap(product)
    return product(a, b)


def apply_lora(base_params: Any, adapters: Any, cfg: LoraConfig) -> Any:
    """Effective parameters: W0 + (alpha / r) A B at every adapted kernel, the base leaf itself everywhere else
    (Hu et al. 2021, eq. 3). Differentiable in `adapters`; boxed inputs are unboxed. The result has the base's
    structure and dtypes, so `DecoderLM.apply` runs on it unchanged."""
    base_params, adapters = nn.meta.unbox(base_params), nn.meta.unbox(adapters)
    scale = cfg.scale

    def merge(base, node, path):
        if _is_adapter(node):
            a, b = node["a"], node["b"]
            if not hasattr(base, "ndim"):
                raise ValueError(f"adapter at {path} sits on a parameter subtree ({sorted(base)}), not on a kernel; "
                                 f"expected adapters at kernel paths such as {path}/kernel")
            stack = a.ndim + b.ndim - 2 - base.ndim
            if stack < 0 or a.shape[:stack] != b.shape[:stack] or a.shape[-1] != b.shape[stack] \
                    or a.shape[:-1] + b.shape[stack + 1:] != base.shape:
                raise ValueError(f"adapter at {path} (a {a.shape}, b {b.shape}) does not fit the base parameter of "
                                 f"shape {base.shape}: expected a [*stack, *in, r] and b [*stack, r, *out] with "
                                 f"[*stack, *in, *out] = {base.shape}")
            delta = lora_delta(a.astype(jnp.float32), b.astype(jnp.float32), stack)
            return (base.astype(jnp.float32) + scale * delta).astype(base.dtype)
        if not isinstance(node, dict) or not isinstance(base, dict):
            raise ValueError(f"adapter tree does not match the base parameters at {path or '<root>'}")
        missing = [key for key in node if key not in base]
        if missing:
            raise ValueError(f"adapter for {path + '/' if path else ''}{missing[0]} has no base parameter; the base "
                             f"has {sorted(base)} there")
        out = dict(base)
        for key, sub in node.items():
            out[key] = merge(base[key], sub, f"{path}/{key}" if path else str(key))
        return out

    return merge(base_params, adapters, "")


def merge_lora(base_params: Any, adapters: Any, cfg: LoraConfig) -> Any:
    """Plain parameters with the adapters folded in (W0 + (alpha / r) A B), for export, sampling and checkpoints
    of the base model's own format: the same computation as `apply_lora`, named for its use."""
    return apply_lora(base_params, adapters, cfg)


def count_adapter_params(adapters: Any) -> int:
    """Number of trainable adapter parameters: r (in + out) per adapted matrix and stacked layer."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(adapters)))
