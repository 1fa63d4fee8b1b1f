"""The preference phase (jaxalign.train.preference): one config with one beta default, evaluation at step 0 and
every eval_every steps, best-checkpoint selection (earliest on ties, step 0 a candidate, lower-is-better metrics),
the same parameters whether or not a run is interrupted, and LoRA returning the merged policy."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign.data.iterator import ArrayDataset
from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.models.lora import merge_lora
from jaxalign.rundir import params_sha256
from jaxalign.sharding import MeshConfig, make_mesh
from jaxalign.testing import random_pairs
from jaxalign.train import preference
from jaxalign.train.checkpoint import CheckpointConfig
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.preference import (
    CustomLoss,
    Evaluation,
    LoraSection,
    PreferenceConfig,
    select_checkpoint,
    train_preference,
)

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=12)
PAIRS, WIDTH, PROMPT = 16, 12, 4
MESH = make_mesh(MeshConfig(), jax.devices()[:1])
DPO = PreferenceConfig(steps=6, batch_size=4, eval_every=2, optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))


@functools.lru_cache(maxsize=None)
def initial_policy() -> dict:
    return jax.device_get(nn.meta.unbox(init_params(CFG, jax.random.key(3))))


def pairs() -> ArrayDataset:
    """PAIRS random pairs, completions of unequal lengths."""
    rng = np.random.default_rng(0)
    lengths = lambda: rng.integers(1, WIDTH - PROMPT + 1, PAIRS)  # noqa: E731
    return ArrayDataset(random_pairs(rng, lengths(), lengths(), WIDTH, PROMPT, CFG.vocab_size))


def scripted_evaluation(scores: list[float], seen: list, maximize: bool = True) -> Evaluation:
    """An evaluation returning `scores` in call order and recording the parameters it saw."""

    def evaluate(params) -> dict:
        seen.append(params_sha256(params))
        return {"eval/score": scores[len(seen) - 1]}

    return Evaluation(evaluate, ("eval/score",), select="eval/score", maximize=maximize)


def run(tmp_path, cfg: PreferenceConfig, evaluation: Evaluation, **kwargs):
    return train_preference(
        cfg, model_cfg=CFG, mesh=MESH, init_params=initial_policy(), data=pairs(),
        directory=str(tmp_path / "checkpoints"), log=MetricsLog(str(tmp_path / "metrics.jsonl")),
        evaluation=evaluation, seed=0, checkpoint=CheckpointConfig(every_steps=100, keep_last=1),
        metadata={"test": True}, cache_dir=str(tmp_path / "cache"), tokenization={"test": 1}, show_progress=False,
        **kwargs)


def test_one_beta_default_shared_by_every_preference_experiment():
    from jaxalign.experiments.arith_kit import ArithDPOConfig
    from jaxalign.experiments.dpo_files import DPOFilesConfig

    assert PreferenceConfig().beta is None  # each objective's own default: 0.1 for DPO (Rafailov et al. 2023, TRL)
    assert preference.resolved_hyperparameters(PreferenceConfig())["beta"] == 0.1
    assert type(ArithDPOConfig().dpo) is type(DPOFilesConfig().dpo) is PreferenceConfig
    assert DPOFilesConfig().dpo.beta == PreferenceConfig().beta
    assert ArithDPOConfig().dpo.beta == 2.0  # ARITH's own setting (a tiny model over-optimises at 0.1)


def test_the_resolved_objective_line_names_every_value_the_phase_trains_with():
    from jaxalign.experiments.arith_kit import ArithDPOConfig

    assert preference.objective_lines(ArithDPOConfig()) == [
        "dpo: sigmoid(beta=2.0, f_alpha=0.5, f_divergence=reverse_kl, label_smoothing=0.0) + 1 x chosen NLL (RPO); "
        "reference: cached"]
    simpo = PreferenceConfig(objective="simpo", objective_args="gamma_beta_ratio=0")
    assert preference.describe_objective(simpo) == ("simpo(beta=2.0, gamma_beta_ratio=0, label_smoothing=0.0); "
                                                    "reference: none (reference-free)")
    assert preference.implicit_reward_beta(simpo) == 2.0  # SimPO's own beta
    assert preference.implicit_reward_beta(PreferenceConfig(objective="adpo")) == 0.1  # takes none: DPO's
    assert preference.implicit_reward_beta(PreferenceConfig(objective="adpo", beta=3.0)) == 3.0


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("eval_every", 0),
                                          ("grad_accum_steps", 0), ("steps", 1.5), ("steps", True)])
def test_config_refuses_non_positive_sizes_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"dpo\.{field} must be a positive integer, got {value!r}"):
        PreferenceConfig(**{field: value})


def test_config_refuses_unknown_reference_and_objective_arguments():
    with pytest.raises(ValueError, match="dpo.reference must be one of"):
        PreferenceConfig(reference="frozen")
    with pytest.raises(ValueError, match="takes no gamma"):
        PreferenceConfig(objective="sigmoid", objective_args="gamma=1")


def test_select_checkpoint_earliest_on_ties_and_either_direction():
    history = [{"step": 0, "m": 0.5}, {"step": 2, "m": 0.9}, {"step": 4, "m": 0.9}, {"step": 6, "m": 0.1}]
    assert select_checkpoint(history, "m")["step"] == 2
    assert select_checkpoint(history, "m", maximize=False)["step"] == 6
    assert select_checkpoint([{"step": 0, "m": 1.0}, {"step": 2, "m": 1.0}], "m", maximize=False)["step"] == 0


def test_selection_returns_the_evaluated_parameters_of_the_best_step(tmp_path):
    """Evaluations at steps 0, 2, 4, 6 score 0.1, 0.5, 0.9, 0.3: the phase returns exactly the parameters it
    evaluated at step 4 (restored from that step's checkpoint), and the last step's separately."""
    seen: list[str] = []
    result = run(tmp_path, DPO, scripted_evaluation([0.1, 0.5, 0.9, 0.3], seen))
    assert [r["step"] for r in result.history] == [0, 2, 4, 6]
    assert result.selected_step == 4
    assert params_sha256(result.selected) == seen[2]
    assert params_sha256(result.last) == seen[3] != seen[2]
    assert seen[0] == params_sha256(initial_policy())


def test_step_zero_wins_when_training_never_helps_and_lower_is_better(tmp_path):
    seen: list[str] = []
    result = run(tmp_path, DPO, scripted_evaluation([0.2, 0.5, 0.9, 0.3], seen, maximize=False))
    assert result.selected_step == 0
    assert params_sha256(result.selected) == params_sha256(initial_policy())


def test_without_selection_the_last_step_is_returned(tmp_path):
    seen: list[str] = []
    result = run(tmp_path, dataclasses.replace(DPO, select_best=False), scripted_evaluation([0.1, 0.9, 0.5, 0.3],
                                                                                            seen))
    assert result.selected_step == 6 and params_sha256(result.selected) == seen[3]


def test_an_interrupted_phase_resumes_to_the_same_selection(tmp_path, monkeypatch):
    """Killed after its step-4 checkpoint, a re-run resumes there and returns the same parameters and history as an
    uninterrupted run; the evaluations already logged are not repeated."""
    scores = [0.1, 0.5, 0.9, 0.3]
    whole = run(tmp_path / "whole", DPO, scripted_evaluation(scores, []))

    real_loop = preference.train_loop

    def killed_after_step_4(**kwargs):
        real_loop(**dict(kwargs, num_steps=4))
        raise KeyboardInterrupt

    monkeypatch.setattr(preference, "train_loop", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", DPO, scripted_evaluation(scores, []))
    monkeypatch.setattr(preference, "train_loop", real_loop)
    seen: list[str] = []
    resumed = run(tmp_path / "resumed", DPO, scripted_evaluation([0.3], seen))  # only step 6 is evaluated again
    assert len(seen) == 1
    assert resumed.history == whole.history
    assert params_sha256(resumed.selected) == params_sha256(whole.selected)
    assert params_sha256(resumed.last) == params_sha256(whole.last)


def test_lora_returns_the_merged_policy_and_trains_only_adapters(tmp_path):
    lora = LoraSection(rank=2, alpha=4.0)
    result = run(tmp_path, dataclasses.replace(DPO, select_best=False), scripted_evaluation([0.0] * 4, []),
                 lora=lora)
    merged = merge_lora(initial_policy(), result.state_params, lora.config())
    assert params_sha256(result.last) == params_sha256(merged) != params_sha256(initial_policy())
    assert len(jax.tree_util.tree_leaves(result.state_params)) < len(jax.tree_util.tree_leaves(initial_policy()))


def test_a_custom_loss_refuses_lora_before_any_work(tmp_path):
    custom = CustomLoss(loss_fn=lambda params, frozen, batch: None, batch_size=4, token_keys=())
    with pytest.raises(ValueError, match="a custom loss trains full parameters"):
        run(tmp_path, DPO, scripted_evaluation([0.0], []), lora=LoraSection(rank=2), custom=custom)
    assert not (tmp_path / "checkpoints").exists()
