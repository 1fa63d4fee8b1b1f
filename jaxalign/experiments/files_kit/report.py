"""The part of a files experiment's results.json that says what was read and what was trained."""
from __future__ import annotations

from jaxalign.experiments.files_kit.model import model_format
from jaxalign.models.llama import count_params
from jaxalign.models.lora import count_adapter_params


def data_and_model_summary(cfg, data_report: dict, base, state_params, family: str | None) -> dict:
    """Rows read and skipped (validation and tokenization), truncations, the whole data report, and the model's
    parameter counts (trained: the adapters' with LoRA), format and family. Nothing dropped goes unreported."""
    validation, tokenization = data_report["validation"], data_report["tokenization"]
    return {
        "rows_read": validation["rows_read"],
        "rows_skipped": validation["rows_skipped"] + tokenization["rows_skipped"],
        "prompts_truncated": tokenization["prompts_truncated"],
        "completions_truncated": tokenization["completions_truncated"],
        "data": data_report,
        "num_params": count_params(base),
        "num_trainable_params": count_adapter_params(state_params) if cfg.lora.rank else count_params(base),
        "model_format": model_format(cfg.model.path),
        "family": family,
    }


__all__ = ["data_and_model_summary"]
