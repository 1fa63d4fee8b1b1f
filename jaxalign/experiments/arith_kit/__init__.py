"""The ARITH experiment kit: what every experiment on the built-in ARITH task composes (`jaxalign.tasks.arith`).

- `config`: the main job's config (`ArithDPOConfig`), its SFT / pairs sections, ARITH's preference phase
  (`ARITH_DPO`), the task variants;
- `data`: the problem split, SFT demonstrations, on-policy samples, oracle-graded pairs and ranked lists, gold
  answers as completions;
- `evaluation`: greedy accuracy (cached per parameter hash), drift from the reference;
- `phases`: start (checks, claim, SFT), supervised training, the preference phase with ARITH's validation guard,
  objective extras, finish (results.json and plot);
- `loop`: iteration t's config and fresh prompts for iterative algorithms;
- `comparison`: the method-vs-baseline loop (TRPA, BRAIn vs DPO on the same samples).

An experiment module imports this kit and the library, never another experiment. The flat namespace below is what
experiments use: `from jaxalign.experiments import arith_kit as kit`, then `kit.train_dpo(...)`.
"""
from jaxalign.experiments.arith_kit.config import (  # noqa: F401
    ARITH_DPO,
    COMPLETION_LEN,
    PROMPT_LEN,
    TASK_VARIANTS,
    ArithDPOConfig,
    PairConfig,
    SFTConfig,
    completion_budget,
    completion_len,
    sft_variant,
    task_config,
)
from jaxalign.experiments.arith_kit.data import (  # noqa: F401
    Problems,
    build_pairs,
    build_ranked_lists,
    grade_completions,
    load_dataset,
    on_policy_lists,
    on_policy_pairs,
    on_policy_samples,
    sample_completions,
    save_dataset,
    sft_dataset,
    split,
    teacher_completions,
)
from jaxalign.experiments.arith_kit.evaluation import (  # noqa: F401
    cached_greedy_eval,
    drift_from_reference,
    greedy_eval,
)
from jaxalign.experiments.arith_kit.loop import check_loop_fields, iteration_config, iteration_prompts  # noqa: F401
from jaxalign.experiments.arith_kit.phases import (  # noqa: F401
    ExperimentStart,
    finish_experiment,
    start_experiment,
    train_dpo,
    train_sft,
    train_supervised,
    training_data,
    validate_config,
    validation,
    with_objective_extras,
)
