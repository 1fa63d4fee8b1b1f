"""Tests for jaxalign.overrides: typed key=value overrides of nested frozen config dataclasses."""
from __future__ import annotations

import dataclasses

import pytest

from jaxalign.experiments.arith_kit import ArithDPOConfig
from jaxalign.overrides import ConfigError, apply_overrides, valid_keys


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    count: int = 2
    flag: bool = False
    name: str = "a"

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"inner.count must be >= 0, got {self.count!r}")


@dataclasses.dataclass(frozen=True)
class Middle:
    inner: Inner = Inner()
    depth: int = 1


@dataclasses.dataclass(frozen=True)
class Outer:
    seed: int = 0
    maybe: int | None = None
    sizes: tuple = (1, 2)
    middle: Middle = Middle()
    inner: Inner = Inner()


def test_nested_keys_replace_only_the_named_field():
    """'a.b.c=v' returns a new config with that one leaf changed; the original is untouched."""
    cfg = Outer()
    new = apply_overrides(cfg, ["middle.inner.count=7", "inner.name=zz"])
    assert new.middle.inner.count == 7 and new.inner.name == "zz"
    assert new == dataclasses.replace(cfg, middle=Middle(inner=Inner(count=7)), inner=Inner(name="zz"))
    assert cfg == Outer()


def test_no_overrides_returns_an_equal_config():
    """An empty override list is the identity."""
    assert apply_overrides(Outer(), []) == Outer()


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_bool_parsing(raw, expected):
    """Booleans accept true/false, 1/0, yes/no in any case, and come back as real bools."""
    value = apply_overrides(Outer(), [f"inner.flag={raw}"]).inner.flag
    assert value is expected


def test_bool_rejects_other_words():
    """A word that is not a boolean is an error naming the key and the value."""
    with pytest.raises(ConfigError, match=r"inner\.flag='maybe': expected a boolean"):
        apply_overrides(Outer(), ["inner.flag=maybe"])


def test_int_parsing():
    """Integers parse to int; floats, words and empty values are errors naming key and value."""
    assert apply_overrides(Outer(), ["seed=-3"]).seed == -3
    assert type(apply_overrides(Outer(), ["seed=12"]).seed) is int
    for raw in ("1.5", "1e3", "abc", ""):
        with pytest.raises(ConfigError, match=rf"seed='{raw}': expected an integer"):
            apply_overrides(Outer(), [f"seed={raw}"])


def test_float_parsing():
    """Floats accept integers and scientific notation and come back as float."""
    for raw, expected in (("1e-3", 1e-3), ("3", 3.0), ("-0.25", -0.25)):
        value = apply_overrides(Outer(), [f"inner.rate={raw}"]).inner.rate
        assert value == expected and type(value) is float
    with pytest.raises(ConfigError, match=r"inner\.rate='fast': expected a number"):
        apply_overrides(Outer(), ["inner.rate=fast"])


def test_str_values_are_taken_verbatim_and_may_contain_equals():
    """Strings are not parsed; only the first '=' separates key from value."""
    assert apply_overrides(Outer(), ["inner.name=x=y"]).inner.name == "x=y"
    assert apply_overrides(Outer(), ["inner.name=123"]).inner.name == "123"


def test_optional_fields_accept_none_or_the_inner_type():
    """`int | None` takes none/null or an integer; anything else reports the integer error."""
    assert apply_overrides(Outer(maybe=3), ["maybe=none"]).maybe is None
    assert apply_overrides(Outer(), ["maybe=null"]).maybe is None
    assert apply_overrides(Outer(), ["maybe=4"]).maybe == 4
    with pytest.raises(ConfigError, match=r"maybe='x': expected an integer"):
        apply_overrides(Outer(), ["maybe=x"])


def test_unsupported_field_types_are_rejected():
    """A field whose type has no command-line syntax (here a tuple) says so instead of guessing."""
    with pytest.raises(ConfigError, match="sizes.*cannot be set from the command line"):
        apply_overrides(Outer(), ["sizes=1,2"])


def test_whitespace_around_key_and_value_is_ignored():
    """' key = value ' is the same as 'key=value'."""
    assert apply_overrides(Outer(), [" inner.count = 5 "]).inner.count == 5


def test_later_overrides_win():
    """Overrides apply in order, so the last one for a key wins."""
    assert apply_overrides(Outer(), ["seed=1", "seed=2"]).seed == 2


def test_missing_equals_sign_is_an_error():
    """An argument without '=' is reported as not being key=value."""
    with pytest.raises(ConfigError, match=r"override 'seed' is not of the form key=value"):
        apply_overrides(Outer(), ["seed"])


@pytest.mark.parametrize("key, hint", [
    ("nosuch", "valid top-level keys are: seed, maybe, sizes, middle, inner"),
    ("inner.nosuch", "inner has: rate, count, flag, name"),
    ("middle.inner.nosuch", "middle.inner has: rate, count, flag, name"),
    ("seed.sub", "did you mean 'seed'?"),
    ("middle.nosuch.count", "did you mean 'middle.inner.count' or 'inner.count'?"),
    ("inner.rat", "did you mean 'inner.rate'?"),
    ("midle.depth", "did you mean 'middle.depth'?"),
])
def test_unknown_keys_are_one_line_with_the_closest_valid_keys(key, hint):
    """An unknown key (at any depth, or below a leaf) names the whole dotted key and, on the same line, the
    closest valid keys, or else the names valid where it went wrong."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(Outer(), [f"{key}=1"])
    message = str(info.value)
    assert message.startswith(f"unknown config key {key!r}; ") and "\n" not in message
    assert hint in message


def test_field_errors_carry_the_full_dotted_path():
    """The same config class under two paths: its field check's message names the path actually overridden."""
    for section in ("sft.optim", "dpo.optim"):
        with pytest.raises(ConfigError) as info:
            apply_overrides(ArithDPOConfig(), [f"{section}.learning_rate=inf"])
        assert str(info.value) == f"{section}.learning_rate must be a finite number > 0, got inf"


def test_setting_a_nested_config_itself_is_rejected():
    """'inner=3' cannot replace a nested dataclass; the error names the key and lists its fields' dotted keys."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(Outer(), ["inner=3"])
    message = str(info.value)
    assert "'inner'" in message and "inner.count" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"(?s)'model'.*model\.d_model"):
        apply_overrides(ArithDPOConfig(), ["model=3"])


def test_post_init_rejections_become_config_errors_naming_key_and_value():
    """A value of the right type but the wrong range is rejected by the dataclass, reported with key and value."""
    with pytest.raises(ConfigError, match=r"inner\.count.*-1.*must be >= 0, got -1"):
        apply_overrides(Outer(), ["inner.count=-1"])


@pytest.mark.parametrize("overrides", [
    ["model.n_heads=3", "model.n_kv_heads=3"],
    ["model.n_kv_heads=3", "model.n_heads=3"],
])
def test_coupled_fields_can_be_changed_together_in_any_order(overrides):
    """Validation applies to the final config, not to each intermediate one: from the default 4 query / 2 key-value
    heads, 3/3 is valid, although both one-field intermediates (3/2 and 4/3) are not."""
    cfg = apply_overrides(ArithDPOConfig(), overrides)
    assert (cfg.model.n_heads, cfg.model.n_kv_heads) == (3, 3)


def test_valid_keys_are_the_dotted_leaves():
    """valid_keys lists leaves in field order with dotted paths, and never a nested config itself."""
    assert valid_keys(Outer()) == [
        "seed", "maybe", "sizes",
        "middle.inner.rate", "middle.inner.count", "middle.inner.flag", "middle.inner.name", "middle.depth",
        "inner.rate", "inner.count", "inner.flag", "inner.name",
    ]


# --- The real experiment config. -------------------------------------------------------------------------------


def test_arith_dpo_config_overrides():
    """Typical command-line overrides of the main job's config land in the right nested fields."""
    cfg = apply_overrides(ArithDPOConfig(), [
        "dpo.beta=0.2", "model.dtype=bfloat16", "sft.optim.learning_rate=3e-4", "mesh.tensor=2", "show_progress=no",
        "checkpoint.every_steps=5", "pairs.top_k=4",
    ])
    assert cfg.dpo.beta == 0.2 and cfg.model.dtype == "bfloat16" and cfg.sft.optim.learning_rate == 3e-4
    assert cfg.mesh.tensor == 2 and cfg.show_progress is False and cfg.checkpoint.every_steps == 5
    assert cfg.pairs.top_k == 4 and cfg.dpo.optim == ArithDPOConfig().dpo.optim


def test_every_valid_key_of_the_main_job_can_be_set_to_its_current_value():
    """Each listed key round-trips through its own string form (all field types are command-line settable)."""
    cfg = ArithDPOConfig()
    for key in valid_keys(cfg):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert apply_overrides(cfg, [f"{key}={value}"]) == cfg, key


@pytest.mark.parametrize("override, fragments", [
    ("dpo.beta=-0.1", ["dpo.beta", "-0.1"]),
    ("dpo.beta=0", ["dpo.beta", "0"]),
    ("dpo.beta=nan", ["dpo.beta", "nan"]),
    ("dpo.steps=abc", ["dpo.steps", "abc", "integer"]),
    ("model.dtype=float64", ["model.dtype", "float64"]),
    ("model.n_heads=0", ["model.n_heads", "0"]),
    ("model.n_heads=3", ["model.n_heads=3", "model.n_kv_heads=2"]),
    ("pairs.samples_per_prompt=1", ["pairs.samples_per_prompt", "1"]),
    ("dpo.eval_every=0", ["dpo.eval_every", "0"]),
    ("mesh.fsdp=0", ["mesh.fsdp", "0"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last", "0"]),
    ("sft.optim.learning_rate=-1", ["sft.optim.learning_rate", "-1"]),
])
def test_bad_values_for_the_main_job_name_the_key_and_the_value(override, fragments):
    """Every rejected override is one ConfigError whose message names the key and the offending value."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(ArithDPOConfig(), [override])
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# An experiment's objective settings belong to its objective (issue: a plugin objective silently got the main
# job's beta=2.0 and chosen-NLL term).


def test_choosing_another_objective_gives_it_its_own_defaults_and_no_chosen_nll_term():
    main = ArithDPOConfig().dpo
    assert (main.objective, main.beta, main.sft_weight) == ("sigmoid", 2.0, 1.0)  # tuned for sigmoid DPO
    dpo = apply_overrides(ArithDPOConfig(), ["loss=simpo"]).dpo
    assert (dpo.beta, dpo.sft_weight, dpo.label_smoothing, dpo.objective_args) == (None, 0.0, None, "")
    assert dpo.optim == main.optim and dpo.steps == main.steps  # only the objective's own settings reset


def test_settings_given_with_the_objective_hold_in_any_order():
    for overrides in (["loss=ipo", "dpo.beta=0.5", "dpo.sft_weight=0.2"],
                      ["dpo.sft_weight=0.2", "dpo.beta=0.5", "loss=ipo"]):
        dpo = apply_overrides(ArithDPOConfig(), overrides).dpo
        assert (dpo.objective, dpo.beta, dpo.sft_weight) == ("ipo", 0.5, 0.2)


def test_naming_the_experiments_own_objective_keeps_its_settings():
    assert apply_overrides(ArithDPOConfig(), ["loss=sigmoid"]) == ArithDPOConfig()


def test_objective_arguments_can_be_set_one_at_a_time_and_merge():
    cfg = apply_overrides(ArithDPOConfig(), ["dpo.objective_args=ld_alpha=0.5", "dpo.objective_args.wpo=true"])
    assert cfg.dpo.objective_args == "ld_alpha=0.5,wpo=true" and cfg.dpo.beta == 2.0
    cfg = apply_overrides(cfg, ["dpo.objective_args.ld_alpha=0.3"])
    assert cfg.dpo.objective_args == "ld_alpha=0.3,wpo=true"
    # a new objective starts from no arguments: the old objective's ld_alpha does not follow it
    cfg = apply_overrides(cfg, ["loss=simpo", "dpo.objective_args.gamma_beta_ratio=0"])
    assert cfg.dpo.objective_args == "gamma_beta_ratio=0" and cfg.dpo.beta is None


def test_one_objective_argument_takes_one_value_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="one value per argument"):
        apply_overrides(ArithDPOConfig(), ["dpo.objective_args.gamma_beta_ratio=0,1"])
    with pytest.raises(ConfigError, match="takes no gamma"):
        apply_overrides(ArithDPOConfig(), ["dpo.objective_args.gamma=1"])


def test_nested_preference_sections_reset_too():
    from jaxalign.experiments.iterative_dpo import IterativeConfig

    cfg = apply_overrides(IterativeConfig(), ["base.dpo.objective=sppo_hard"])
    assert (cfg.base.dpo.beta, cfg.base.dpo.sft_weight) == (None, 0.0)


def test_a_config_file_keeps_its_values_of_the_reset_fields(tmp_path):
    """A run's config.json fed back with --config: simpo at beta 2.0 (equal to the main job's) stays at 2.0."""
    import json

    from jaxalign.overrides import file_overrides
    from jaxalign.rundir import config_to_dict

    trained = apply_overrides(ArithDPOConfig(), ["loss=simpo", "dpo.beta=2.0", "dpo.sft_weight=1.0"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(trained)))
    assert apply_overrides(ArithDPOConfig(), file_overrides(ArithDPOConfig(), str(path))) == trained
