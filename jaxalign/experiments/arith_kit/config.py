"""The ARITH experiments' configuration: the main job's config (`ArithDPOConfig`), its phases' sections and the
built-in task variants. Every ARITH experiment embeds or extends `ArithDPOConfig`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

from jaxalign.algorithms.objective_extras import ExtrasConfig
from jaxalign.models.llama import ModelConfig
from jaxalign.sharding import MeshConfig
from jaxalign.tasks import arith
from jaxalign.train.checkpoint import CheckpointConfig
from jaxalign.train.loop import ON_NONFINITE
from jaxalign.train.optim import OptimConfig
from jaxalign.train.preference import LoraSection, PreferenceConfig
from jaxalign.validation import (
    check_choice,
    check_divides,
    check_int,
    check_non_negative,
    check_number,
    check_positive_int,
)

PROMPT_LEN = 8  # "a+b+c+d=" with single digits


def completion_len(task: arith.ArithConfig) -> int:
    """Completion slots a task needs: its longest demonstration (`arith.max_completion_chars`) + EOS + one slot of
    slack (so a policy that runs on past the longest answer is seen doing so rather than cut off exactly there)."""
    return arith.max_completion_chars(task) + 2


def completion_budget(model_cfg: ModelConfig) -> int:
    """How many tokens sampling may generate: the model's context after the prompt."""
    return model_cfg.max_len - PROMPT_LEN


COMPLETION_LEN = completion_len(arith.ArithConfig())  # 24: "9+9=18;18+9=27;27+9=36" (22 chars) + EOS + slack


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on the noisy demonstrations (the policy DPO starts from and its reference)."""

    steps: int = 600  # optimizer steps
    batch_size: int = 64  # demonstrations per step (split over the data-parallel devices)
    grad_accum_steps: int = 1  # microbatches per step, accumulated exactly (batch_size must divide)
    optim: OptimConfig = OptimConfig(learning_rate=2e-3, warmup_steps=100)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient norm: "stop" the run, or "skip-batch" (counted)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps"):
            check_positive_int("sft", name, getattr(self, name))
        check_choice("sft", "on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_divides("sft", "batch_size", self.batch_size, "grad_accum_steps", self.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """On-policy pair construction: `samples_per_prompt` samples for each of `num_prompts` training prompts.

    Two knobs make the judge imperfect on purpose (the built-in length-bias and noisy-label tasks):
    length_bonus: the judge ranks samples by oracle score + length_bonus * (completion tokens), so longer responses
        win more often than their quality warrants;
    label_flip_rate: each kept pair's chosen and rejected are swapped with this probability (seeded; the number of
        flipped pairs is reported), the label-noise model of cDPO / robust DPO.
    """

    num_prompts: int = 2048  # training prompts sampled from the SFT policy
    samples_per_prompt: int = 8  # completions sampled per prompt; the best and the worst form its pair
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int = 0  # sample among the k most likely tokens only (0: off)
    min_score_gap: float = 0.5  # a pair is kept only if the oracle scores of chosen and rejected differ this much
    require_correct_chosen: bool = True  # a pair is kept only if its chosen completion is exactly correct
    length_bonus: float = 0.0
    label_flip_rate: float = 0.0

    def __post_init__(self):
        check_positive_int("pairs", "num_prompts", self.num_prompts)
        check_int("pairs", "samples_per_prompt", self.samples_per_prompt, minimum=2)  # two to form a pair
        check_number("pairs", "temperature", self.temperature, low=0)  # 0 = greedy
        check_int("pairs", "top_k", self.top_k, minimum=0)  # 0 = off
        check_non_negative("pairs", "min_score_gap", self.min_score_gap)
        check_non_negative("pairs", "length_bonus", self.length_bonus)
        # at 0.5 the labels carry no information, above it they point the wrong way
        check_number("pairs", "label_flip_rate", self.label_flip_rate, low=0, high=0.5, high_open=True)


# The main job's preference phase. beta is large for a tiny model (the usual 0.1 over-optimises within a few dozen
# steps here), and sft_weight adds the chosen-NLL regulariser; see the README's measurements. Listwise objectives
# train on ranked lists of all K graded samples of a prompt, 16 lists of 8 = the sequences of 64 pairs per step.
ARITH_DPO = PreferenceConfig(steps=150, batch_size=64, list_batch_size=16, beta=2.0, sft_weight=1.0,
                             optim=OptimConfig(learning_rate=5e-5, warmup_steps=20), eval_every=25)


@dataclasses.dataclass(frozen=True)
class ArithDPOConfig:
    """Everything the main job needs; every field can be overridden from the command line (key=value)."""

    seed: int = 0  # every random choice of the run: data split, initialisation, sampling, batch order
    task: arith.ArithConfig = arith.ArithConfig()
    model: ModelConfig = ModelConfig(vocab_size=16, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                                     mlp_dim=344, max_len=PROMPT_LEN + COMPLETION_LEN)
    mesh: MeshConfig = MeshConfig()
    sft: SFTConfig = SFTConfig()
    pairs: PairConfig = PairConfig()
    dpo: PreferenceConfig = ARITH_DPO
    extras: ExtrasConfig = ExtrasConfig()
    lora: LoraSection = LoraSection()
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=100, keep_last=2)
    eval_fraction: float = 0.2  # fraction of all problems held out as the test set (never trained on)
    num_val_prompts: int = 256  # training problems set aside for validation during DPO (best-checkpoint selection)
    eval_batch_size: int = 1024  # problems per batch of greedy or sampled evaluation
    show_progress: bool = True  # progress bars with rate and ETA on the terminal (never part of the result)
    log_every: int = 10  # metrics.jsonl gets a record every this many steps (and at every validation step)

    # `jaxalign run arith_dpo loss=NAME` is short for dpo.objective=NAME.
    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"loss": "dpo.objective"}

    def __post_init__(self):
        check_int("", "seed", self.seed)
        check_number("", "eval_fraction", self.eval_fraction, low=0, high=1, low_open=True, high_open=True)
        for name in ("num_val_prompts", "eval_batch_size", "log_every"):
            check_positive_int("", name, getattr(self, name))


# The built-in task variants (issue 3's benchmark tasks): each is the main job with these changes, per config section.
# Verbose demonstrations end with 0-3 recaps of the answer (";24"), which the oracle ignores, so length and
# correctness are independent; the model gets room for them.
_VERBOSE_TASK = arith.ArithConfig(max_recaps=3, recap_prob=0.4)


_VERBOSE = {"task": {"max_recaps": _VERBOSE_TASK.max_recaps, "recap_prob": _VERBOSE_TASK.recap_prob},
            "model": {"max_len": PROMPT_LEN + completion_len(_VERBOSE_TASK)}}


TASK_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "arith": {},
    # the length-bias task's control: the same verbose demonstrations, judged by the oracle alone
    "verbose": _VERBOSE,
    # ... judged with 0.5 score per completion token: one recap (3 tokens) outweighs a correct step, and two outweigh
    # most of the gap between a right and a wrong answer
    "length_bias": {**_VERBOSE, "pairs": {"length_bonus": 0.5}},
    # 30% of the pairs flipped, the label-noise model cDPO and robust DPO are built for
    "noisy_labels": {"pairs": {"label_flip_rate": 0.3}},
}


def task_config(cfg: "ArithDPOConfig", task: str) -> "ArithDPOConfig":
    """`cfg` turned into one of the TASK_VARIANTS."""
    if task not in TASK_VARIANTS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASK_VARIANTS)}")
    changes = {section: dataclasses.replace(getattr(cfg, section), **fields)
               for section, fields in TASK_VARIANTS[task].items()}
    return dataclasses.replace(cfg, **changes)


def sft_variant(task: str) -> str:
    """The part of a task variant that changes the SFT phase (its demonstrations or model), as a short stable name;
    '' for variants that share the main job's SFT policy. Variants with the same name can share one SFT policy."""
    changes = {section: TASK_VARIANTS[task][section] for section in ("task", "model") if section in TASK_VARIANTS[task]}
    if not changes:
        return ""
    return "sft_" + hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:10]
