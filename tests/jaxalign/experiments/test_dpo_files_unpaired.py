"""dpo_files on unpaired rows (prompt, completion, label): KTO and BCO end to end on a tiny random Llama built with
transformers, the sample tokenizer and tests/data/preferences/unpaired_mixed.jsonl (plus generated rows in the same
style and two malformed rows).

One KTO run (full parameters, cached reference, export, best-step selection, skipped rows counted) backs the
walkthrough: its held-out KTO loss at step 0 is the NumPy value at policy = reference (the label weights times 1/2),
its reward accuracy and margin 0, and training lowers the loss; the same run killed after step 4 and re-run ends
bit-identical. BCO trains LoRA adapters with an online reference. The KTO loss a training step computes equals a
NumPy KTO from the same log-probs, mismatched sequences included. A format / objective mismatch is one line before
any directory exists."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dpo_files_support import DATA, read_rows, tiny_hf_model, write_jsonl
from jaxalign.experiments import dpo_files
from jaxalign.overrides import apply_overrides
from jaxalign.train import preference

STEPS = 6
UNDESIRABLE_WEIGHT = 1.5
COMMON = [f"dpo.steps={STEPS}", "dpo.batch_size=4", "dpo.beta=0.5", "dpo.optim.learning_rate=1e-2",
          "dpo.optim.warmup_steps=0", "dpo.eval_every=3", "data.max_length=40", "data.eval_fraction=0.25",
          "checkpoint.every_steps=1", "log_every=1", "show_progress=false", "eval_batch_size=16",
          "data.format=unpaired"]
BAD_ROWS = [{"prompt": "Question: what is 1+2?\nAnswer:", "completion": " 3", "label": "yes"},
            {"prompt": "Question: what is 2+3?\nAnswer:", "label": True}]


def unpaired_rows() -> list[dict]:
    """The sample rows plus 24 generated ones: a correct sum is desirable, a wrong or hedged one is not (a pattern a
    tiny model picks up in a few steps, so the held-out loss can go down)."""
    rows = read_rows("unpaired_mixed.jsonl")
    rng = np.random.default_rng(2)
    for i in range(24):
        a, b = (int(x) for x in rng.integers(1, 40, 2))
        good = i % 3 != 0
        answer = f" {a + b}" if good else f" {a + b + int(rng.integers(1, 9))}, I think"
        rows.append({"prompt": f"Question: what is {a}+{b}?\nAnswer:", "completion": answer, "label": good})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(Hugging Face model dir with the tokenizer files, the unpaired file with two malformed rows inside)."""
    root = tmp_path_factory.mktemp("dpo_files_unpaired")
    rows = unpaired_rows()
    return tiny_hf_model(root), write_jsonl(root / "labels.jsonl", rows[:5] + BAD_ROWS + rows[5:])


def config(*overrides: str) -> dpo_files.DPOFilesConfig:
    return apply_overrides(dpo_files.DPOFilesConfig(), [*COMMON, *overrides])


def kto_config(hf_dir, data) -> dpo_files.DPOFilesConfig:
    return config(f"model.path={hf_dir}", f"data.path={data}", "loss=kto", "dpo.beta=0.5",
                  f"dpo.objective_args=undesirable_weight={UNDESIRABLE_WEIGHT}", "data.on_error=skip",
                  "dpo.select_best=true", "export.enabled=true", "dpo.optim.learning_rate=3e-3")


@pytest.fixture(scope="module")
def kto_run(files, tmp_path_factory):
    hf_dir, data = files
    workdir = tmp_path_factory.mktemp("kto")
    cfg = kto_config(hf_dir, data)
    return cfg, workdir, dpo_files.run(cfg, str(workdir))


def heldout_losses(results: dict) -> list[float]:
    return [r["eval/loss"] for r in results["eval_history"]]


def test_kto_walkthrough(kto_run):
    """Held-out KTO loss at step 0 = mean over held-out rows of (weight of its label) * (1 - sigmoid(0)); training
    lowers it; rewards all 0 at step 0; rows counted; the plot and the export are written."""
    _, workdir, results = kto_run
    rows = unpaired_rows()
    _, held = dpo_files.split_rows(len(rows), 0.25, seed=0)
    weights = [1.0 if rows[i]["label"] else UNDESIRABLE_WEIGHT for i in held]
    losses = heldout_losses(results)
    assert losses[0] == pytest.approx(0.5 * np.mean(weights), rel=1e-6)
    assert results["eval_reward_accuracy_before"] == 0.0 and results["eval_reward_margin_before"] == 0.0
    assert losses[-1] < losses[0] - 0.01, losses
    assert results["eval_after"]["eval/reward_margin"] > 0
    assert [r["step"] for r in results["eval_history"]] == [0, 3, 6]
    assert results["train_completions"] + results["eval_completions"] == len(rows)
    assert results["eval_completions"] == len(held) and results["data"]["format"] == "unpaired"
    assert results["rows_read"] == len(rows) + 2 and results["rows_skipped"] == 2
    assert results["data"]["validation"]["skipped_by_reason"] == {"completion: missing": 1, "label: wrong type": 1}
    assert (workdir / "dpo_heldout.png").stat().st_size > 0
    assert (workdir / "export" / "config.json").is_file() and results["export"]["family"] == "llama"
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["params_sha256"] == results["params_sha256"]


@pytest.fixture(scope="module")
def bco_run(files, tmp_path_factory):
    hf_dir, data = files
    workdir = tmp_path_factory.mktemp("bco")
    cfg = config(f"model.path={hf_dir}", f"data.path={data}", "loss=bco", "dpo.beta=0.5", "data.on_error=skip",
                 "lora.rank=4", "dpo.reference=online", "dpo.optim.learning_rate=3e-3", "checkpoint.keep_last=10")
    return cfg, workdir, dpo_files.run(cfg, str(workdir))


def test_bco_with_lora_and_an_online_reference_trains(bco_run):
    """BCO on LoRA adapters: the held-out loss is log 2 at step 0 (every reward and the baseline 0) and goes down."""
    _, _, results = bco_run
    losses = heldout_losses(results)
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.01, losses
    assert results["eval_reward_margin_before"] == 0.0 and results["eval_after"]["eval/reward_margin"] > 0
    assert 0 < results["num_trainable_params"] < results["num_params"] / 5


def test_a_killed_bco_run_resumes_to_the_same_params(bco_run, tmp_path):
    """What a kill after step 3 leaves (the run's directory without its later checkpoints, results and plot) re-run
    with the same command ends bit-identical to the uninterrupted run: the LoRA adapters, the optimizer, the data
    position and BCO's running reward baseline (in the train state) are restored. (KTO's mismatched sequences and
    cached reference are rebuilt from the file and the seed; the KTO run's resume path is the pairs' one.)"""
    cfg, workdir, full = bco_run
    killed = tmp_path / "run"
    shutil.copytree(workdir, killed)
    for step in (killed / "checkpoints" / "dpo").iterdir():
        if step.name.isdigit() and int(step.name) > 3:
            shutil.rmtree(step)
    for leftover in ("results.json", "dpo_heldout.png", "export"):
        path = killed / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    results = dpo_files.run(cfg, str(killed))
    assert results["params_sha256"] == full["params_sha256"]
    assert results["eval_history"] == full["eval_history"]


def numpy_kto(policy, reference, kl_policy, kl_reference, desirable, beta, weights) -> float:
    """Ethayarajh et al. 2024, eqs. 7-8 in float64: z0 = max(0, mean(kl_policy - kl_reference)), v = lambda_D
    sigmoid(beta (z - z0)) for desirable, lambda_U sigmoid(beta (z0 - z)) for undesirable; loss = mean(lambda - v)."""
    z = np.asarray(policy, np.float64) - np.asarray(reference, np.float64)
    z0 = max(0.0, float(np.mean(np.asarray(kl_policy, np.float64) - np.asarray(kl_reference, np.float64))))
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    lam = np.where(desirable, weights[0], weights[1])
    value = np.where(desirable, weights[0] * sigmoid(beta * (z - z0)), weights[1] * sigmoid(beta * (z0 - z)))
    return float(np.mean(lam - value))


def test_the_kto_loss_of_a_training_step_equals_numpy(kto_run):
    """One fixed batch of the prepared training rows: every mismatched sequence is its row's prompt followed by its
    partner's completion, and the loss the phase trains (online reference, and cached: precomputed log-probs) equals
    a NumPy KTO from the same summed log-probs of policy and reference on the rows and on the mismatched sequences."""
    import jax

    from jaxalign.models.llama import DecoderLM
    from jaxalign.sharding import make_mesh
    from jaxalign.train.unpaired import compute_unpaired_reference_logprobs, mismatch_partners
    from jaxalign.train.step import logits_fn

    cfg, workdir, _ = kto_run
    base, model_cfg, _ = dpo_files.load_model(cfg, make_mesh(cfg.mesh))
    base = jax.device_get(base)
    train, _, _ = dpo_files.load_pairs(cfg, str(workdir), model_cfg, dpo_files.load_tokenizer(cfg))
    arrays = {k: np.asarray(v) for k, v in train.arrays.items()}

    partner = mismatch_partners(len(arrays["tokens"]), cfg.dpo.batch_size, cfg.seed)
    assert not np.any(partner == np.arange(len(partner)))
    for j in range(len(partner)):
        start_j = int(np.argmax(arrays["completion_mask"][j]))
        q = partner[j]
        start_q, end_q = int(np.argmax(arrays["completion_mask"][q])), int(arrays["attention_mask"][q].sum())
        expected = np.concatenate([arrays["tokens"][j, :start_j], arrays["tokens"][q, start_q:end_q]])
        assert arrays["kl_tokens"][j, : len(expected)].tolist() == expected.tolist()
        assert arrays["kl_completion_mask"][j].sum() == end_q - start_q

    batch = {k: v[:8] for k, v in arrays.items()}
    rng = np.random.default_rng(0)
    policy = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), base)
    model = DecoderLM(model_cfg)
    loss_fn, _, _ = preference._loss(cfg.dpo, model, None, None, unpaired=True)
    total, (count, metrics) = jax.jit(loss_fn)(policy, base, batch)
    summed = lambda p, keys: dpo_files.summed_unpaired_logprobs(p, model_cfg, batch, 8, keys)  # noqa: E731
    kl_keys = ("kl_tokens", "kl_attention_mask", "kl_completion_mask")
    expected = numpy_kto(summed(policy, dpo_files.UNPAIRED_ARRAYS), summed(base, dpo_files.UNPAIRED_ARRAYS),
                         summed(policy, kl_keys), summed(base, kl_keys), batch["label"] > 0, 0.5,
                         (1.0, UNDESIRABLE_WEIGHT))
    assert float(total / count) == pytest.approx(expected, rel=1e-5)
    kl = np.mean(summed(policy, kl_keys) - summed(base, kl_keys))
    assert float(metrics["kl"]) == pytest.approx(max(kl, 0.0), rel=1e-4, abs=1e-6)

    cached = dict(batch, **compute_unpaired_reference_logprobs(logits_fn(model), base, batch, 8))
    total, (count, _) = jax.jit(loss_fn)(policy, None, cached)
    assert float(total / count) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fmt, loss, extra, needle", [
    ("unpaired", "sigmoid", "", "loss=sigmoid (dpo.objective) is pairwise and trains on pairs, but "
                                "data.format=unpaired holds single completions"),
    ("unpaired", "plackett_luce", "", "loss=plackett_luce (dpo.objective) is listwise and trains on ranked lists"),
    ("unpaired", "dro", "", "loss=dro (dpo.objective) needs reward, value"),
    ("unpaired", "kto", "dpo.sft_weight=0.1", "dpo.sft_weight=0.1 applies to pairs"),
    ("unpaired", "bco", "dpo.grad_accum_steps=2", "set dpo.grad_accum_steps=1"),
    ("pairwise", "kto", "", "but data.format=pairwise holds pairs; write them as unpaired rows"),
])
def test_a_format_objective_mismatch_is_one_line_before_any_directory(files, tmp_path, fmt, loss, extra, needle):
    hf_dir, data = files
    path = data if fmt == "unpaired" else DATA / "preferences" / "pairwise.jsonl"
    overrides = [f"model.path={hf_dir}", f"data.path={path}", f"loss={loss}", f"data.format={fmt}"]
    with pytest.raises(ValueError) as error:
        dpo_files.run(config(*overrides, *([extra] if extra else [])), str(tmp_path / "run"))
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


def test_unpaired_metrics_against_numpy():
    """Three completions, rewards beta * (policy - reference) by hand; BCO's baseline is the batch's mean reward."""
    policy, reference, labels = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.array([1, 0, 0])
    m = dpo_files.unpaired_metrics(policy, reference, labels, "bco", {"beta": 0.5}, beta=0.5)
    r = 0.5 * policy
    shifted = r - r.mean()
    expected = np.mean([np.logaddexp(0, -shifted[0]), np.logaddexp(0, shifted[1]), np.logaddexp(0, shifted[2])])
    assert m["eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert m["eval/reward_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/desirable_reward"] == pytest.approx(0.5)
    assert m["eval/undesirable_reward"] == pytest.approx((-1.0 + 0.25) / 2)
    assert m["eval/reward_margin"] == pytest.approx(0.5 - (-0.375))
