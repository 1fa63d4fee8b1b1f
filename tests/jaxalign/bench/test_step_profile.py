"""`jaxalign bench step-profile`: every traced operation of the DPO step is attributed to a part of the model and a
pass, and the smoke run's breakdown covers the parts a decoder has. No timing assertions (machine-dependent)."""
import json

import jax
import jax.numpy as jnp
import pytest

from jaxalign.bench import step_profile


@pytest.mark.parametrize("op_name, part, backward", [
    ("jit(run)/jvp(DecoderLM)/layer_0/mlp/up/dot_general", "mlp", False),
    ("jit(run)/transpose(jvp(DecoderLM))/layer_3/mlp/jit(silu)/mul", "mlp", True),
    ("jit(run)/jvp(DecoderLM)/layer_1/attn/bhtd,bhsd->bhts/dot_general", "attention core", False),
    ("jit(run)/transpose(jvp(DecoderLM))/layer_1/attn/k/dot_general", "attention proj.", True),
    ("jit(run)/jvp(DecoderLM)/layer_0/mlp_norm/mul", "norms", False),
    ("jit(run)/jvp(DecoderLM)/embed.attend/dot_general", "embedding/logits", False),
    ("jit(run)/jvp(jit(log_softmax))/reduce_max", "loss/optimizer", False),
    ("", "loss/optimizer", False),
])
def test_operations_are_attributed_by_their_op_name(op_name, part, backward):
    assert step_profile.part_of(op_name) == part and step_profile.is_backward(op_name) == backward


def test_the_breakdown_sums_per_part_and_pass_and_divides_by_the_steps():
    names = {"a": "x/mlp/up/dot_general", "b": "transpose(x)/mlp/down/dot_general", "c": "x/attn/div"}
    rows = {r["part"]: r for r in step_profile.breakdown({"a": 3000.0, "b": 1000.0, "c": 4000.0}, names, steps=2)}
    assert rows["mlp"]["forward_ms"] == 1.5 and rows["mlp"]["backward_ms"] == 0.5 and rows["mlp"]["share"] == 0.5
    assert rows["attention core"]["forward_ms"] == 2.0 and rows["norms"]["share"] == 0.0


def test_a_smoke_profile_of_the_tiny_step_attributes_time_to_every_part_of_the_model(tmp_path, capsys):
    (result,) = step_profile.main(["--sizes", "tiny", "--prompt-len", "4", "--completion-len", "4", "--steps", "1",
                                   "--out", str(tmp_path)])
    parts = {r["part"]: r for r in result["parts"]}
    assert set(parts) == set(step_profile.PARTS)
    assert sum(r["share"] for r in result["parts"]) == pytest.approx(1.0)
    for part in ("mlp", "attention core", "attention proj."):
        assert parts[part]["forward_ms"] > 0 and parts[part]["backward_ms"] > 0, part
    assert json.loads((tmp_path / "step_profile.json").read_text())[0]["size"] == "tiny"
    assert "attention core" in capsys.readouterr().out


def test_the_decode_profile_splits_the_prompt_pass_from_the_token_loop(tmp_path, capsys):
    (result,) = step_profile.main(["--decode", "--sizes", "tiny", "--rows", "2", "--prompt-len", "4", "--new-tokens",
                                   "3", "--steps", "1", "--out", str(tmp_path)])
    parts = {r["part"]: r for r in result["parts"]}
    assert sum(r["share"] for r in result["parts"]) == pytest.approx(1.0)
    for part in ("mlp", "attention core", "attention proj."):  # both passes run every part of the model
        assert parts[part]["forward_ms"] > 0 and parts[part]["decode_us_per_token"] > 0, part
    assert parts["mlp"]["decode_us_per_token"] == pytest.approx(1000 * parts["mlp"]["backward_ms"] / 3)
    assert json.loads((tmp_path / "step_profile_decode.json").read_text())[0]["new_tokens"] == 3
    assert "decode us/token" in capsys.readouterr().out


@pytest.mark.parametrize("op_name, in_loop", [
    ("jit(generate)/while/body/DecoderLM/layer_0/mlp/up/dot_general", True),
    ("jit(generate)/DecoderLM/layer_0/mlp/up/dot_general", False)])
def test_decoding_loop_operations_are_told_from_the_prompt_pass(op_name, in_loop):
    assert step_profile.is_decode_loop(op_name) is in_loop


def test_control_flow_instructions_are_found_and_left_out_of_the_sums():
    """A while loop's trace event spans its body's operations; counting it would count them twice."""
    hlo = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: y * 2 + 1, x)).lower(jnp.ones(3)).compile().as_text()
    loops = {name for name in step_profile.control_flow_ops(hlo) if name.startswith("while")}
    assert len(loops) == 1
    names = {"w": "jit(f)/while", "m": "jit(f)/while/body/DecoderLM/layer_0/mlp/up/dot_general"}
    rows = {r["part"]: r for r in step_profile.breakdown({"w": 9000.0, "m": 1000.0}, names, 1,
                                                         step_profile.is_decode_loop, skip={"w"})}
    assert rows["mlp"]["share"] == 1.0 and rows["loss/optimizer"]["forward_ms"] == 0.0
