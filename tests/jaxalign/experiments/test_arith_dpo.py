"""The main job's pure pieces: the over-optimisation guard's choice and workdir claims (pairs and lists: the kit's
tests, arith_kit/test_pairs_and_lists.py)."""
import dataclasses

import pytest

from jaxalign.experiments import arith_kit as kit
from jaxalign.rundir import claim
from jaxalign.train.preference import select_checkpoint


def test_guard_selects_best_validation_step_and_the_earliest_on_ties():
    """Over-optimisation guard: the best validation accuracy wins, ties go to the step closest to the reference,
    and step 0 (the SFT policy) can win when DPO never helps."""
    history = [{"step": 0, "val/accuracy": 0.1}, {"step": 25, "val/accuracy": 0.6},
               {"step": 50, "val/accuracy": 0.9}, {"step": 75, "val/accuracy": 0.9}, {"step": 100, "val/accuracy": 0.2}]
    assert select_checkpoint(history, "val/accuracy")["step"] == 50
    collapsed = [{"step": 0, "val/accuracy": 0.3}, {"step": 25, "val/accuracy": 0.0}]
    assert select_checkpoint(collapsed, "val/accuracy")["step"] == 0


def test_a_workdir_refuses_a_run_with_another_config(tmp_path):
    """Resuming in a workdir with a different config is one clear error naming the field; presentation-only
    fields (progress bar, eval batch size) may change."""
    cfg = kit.ArithDPOConfig()
    claim(cfg, str(tmp_path))
    claim(dataclasses.replace(cfg, show_progress=False, eval_batch_size=7), str(tmp_path))
    changed = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, beta=0.3))
    with pytest.raises(ValueError, match=r"dpo\.beta=2\.0, but this run has 0\.3"):
        claim(changed, str(tmp_path))
