"""Run configuration: one YAML file, typed sections, command-line overrides, validation up front.

A config has rlvr's own sections (``model``, ``data``, ``reward``, ``forking``, ``warm_start``,
``eval``) and a ``grpo`` section whose keys are TRL ``GRPOConfig`` fields, passed through unchanged.
Every field carries a one-line help that ``rlvr train --help`` prints.

Values are read in three layers: defaults < YAML file < overrides (``--forking.rho 0.3`` or
``forking.rho=0.3``). :func:`validate` runs before any model or dataset is built and raises
:class:`ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlvr.data.arithmetic import ArithmeticTask
from rlvr.data.loader import ANSWER_FORMATS
from rlvr.forking import NORMALIZATIONS, SCOPES, SELECTIONS
from rlvr.models.tiny import ARCHITECTURES, DENSE_ARCHITECTURES, TinyMoESpec


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def _field(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, type):  # a section class, or list/dict: a fresh instance per config
        return field(default_factory=default, metadata=metadata, **kwargs)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda value=default: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = _field(
        "tiny:qwen3_moe",
        "policy: 'tiny:<arch>' (embedded random MoE, arch in "
        + ", ".join(sorted(ARCHITECTURES))
        + "; or dense: "
        + ", ".join(sorted(DENSE_ARCHITECTURES))
        + "), a hub id (Qwen/Qwen3-30B-A3B) or a local checkpoint directory",
    )
    tiny: TinyMoESpec = _field(TinyMoESpec, "size of the embedded tiny MoE (used with 'tiny:<arch>')")
    dtype: str = _field("float32", "weights dtype when loading", choices=("float32", "bfloat16", "float16", "float64"))
    trust_remote_code: bool = _field(False, "allow custom modelling code from the hub")


@dataclass
class DataConfig:
    source: str = _field(
        "arithmetic",
        "'arithmetic' (embedded task), a local .jsonl/.json/.parquet/.csv file, a dataset directory, or a hub name",
    )
    config_name: str | None = _field(None, "hub dataset config (e.g. 'main' for openai/gsm8k)")
    train_split: str = _field("train", "split to train on (hub datasets and dataset dicts)")
    eval_split: str | None = _field("test", "held-out split to evaluate on; null: no held-out evaluation")
    question_column: str = _field("question", "column holding the question")
    answer_column: str = _field("answer", "column holding the gold answer")
    answer_format: str = _field(
        "raw", "how to read the gold answer ('gsm8k' keeps what follows '####')", ANSWER_FORMATS
    )
    system_prompt: str | None = _field(None, "optional system message put before every question")
    chat: bool = _field(True, "conversational prompts (chat template) instead of plain text")
    num_train: int = _field(4000, "training problems (embedded task: generated; files: first N rows, 0 = all)")
    num_eval: int = _field(200, "evaluation problems (first N of the eval split)")
    task: ArithmeticTask = _field(ArithmeticTask, "embedded arithmetic task: terms, operand range, eval share")
    seed: int | None = _field(
        None, "seed of the embedded task's problems (default: the run seed; fix it to share data across seeds)"
    )


@dataclass
class RewardConfig:
    functions: list = _field(
        ["arithmetic_exact"],
        "reward functions: names (arithmetic_exact, math_accuracy, boxed_format) or module:function",
    )
    weights: list | None = _field(None, "one weight per reward function (default: all 1.0)")
    budget_seconds: float = _field(2.0, "math_accuracy: time allowed per completion before it scores failure_score")
    failure_score: float = _field(0.0, "math_accuracy: score of a completion whose verification timed out or failed")
    workers: int = _field(2, "math_accuracy: verification processes (hard time bound); 0 = in-process, main thread")
    fallbacks: list = _field(
        ["answer_tag", "latex", "last_number"],
        "math_accuracy: where to look without a \\boxed{} answer (answer_tag, latex, last_number; [] = boxed only)",
    )
    gold_column: str | None = _field(
        None, "math_accuracy: column with the gold answers (default: answer, else solution)"
    )
    float_rounding: int = _field(
        6, "math_accuracy: decimal places floats are rounded to before comparing (math-verify)"
    )
    numeric_precision: int = _field(15, "math_accuracy: significant digits of numeric evaluation (math-verify)")
    strict: bool = _field(True, "math_accuracy: variables matter and sets never equal tuples (math-verify strict)")
    allow_set_relation_comp: bool = _field(
        False, "math_accuracy: an interval also equals the relation of a gold (1 < x < 2 vs (1,2)), both ways"
    )
    overlong_buffer: int = _field(
        0, "overlong_penalty: tokens before grpo.max_completion_length where the DAPO penalty ramps to -1 (0: a fifth)"
    )


@dataclass
class ForkingConfig:
    rho: float = _field(0.2, "fraction of completion tokens selected as forking tokens (the paper: 0.2)")
    selection: str = _field(
        "top", "which tokens: top (highest entropy), bottom (lowest), random (same count)", SELECTIONS
    )
    scope: str = _field(
        "micro_batch", "unit in which k = ceil(rho * n) is counted (micro_batch is gathered across ranks)", SCOPES
    )
    policy_tokens: str = _field(
        "forking",
        "tokens in the policy-gradient loss: forking (the selection) or all (full/hybrid arms)",
        ("forking", "all"),
    )
    loss_normalization: str = _field(
        "selected",
        "normalise the loss over the selected tokens (the paper) or all completion tokens (TRL)",
        NORMALIZATIONS,
    )
    mask_kl: bool = _field(False, "let the KL penalty's gradient flow only through forking tokens")
    mask_entropy_bonus: bool = _field(True, "apply the entropy bonus on forking tokens only (TRL's behaviour)")
    log_examples: int = _field(2, "completions per logging step written with their forking tokens marked")


GATE_SCOPES = ("all", "completion", "forking")
ROUTER_LOSS_SCOPES = ("none", "all", "completion", "forking")


@dataclass
class MoEConfig:
    router_gate_scope: str = _field(
        "all", "positions whose router gradient is kept: all, completion decisions, or forking decisions", GATE_SCOPES
    )
    router_gate_outside: float = _field(0.0, "router-gradient weight of positions outside router_gate_scope (0 = none)")
    expert_gate_scope: str = _field(
        "all", "positions whose MoE-block-output gradient is kept (same choices as router_gate_scope)", GATE_SCOPES
    )
    expert_gate_outside: float = _field(0.0, "expert-gradient weight of positions outside expert_gate_scope")
    load_balancing_coef: float = _field(0.0, "coefficient of rlvr's load-balancing loss (Switch form); 0 = off")
    load_balancing_scope: str = _field("completion", "tokens the load-balancing loss covers", ROUTER_LOSS_SCOPES)
    z_loss_coef: float = _field(0.0, "coefficient of the router z-loss (ST-MoE); 0 = off")
    z_loss_scope: str = _field("completion", "tokens the router z-loss covers", ROUTER_LOSS_SCOPES)
    router_loss_batch: str = _field(
        "global",
        "tokens the router losses pool: global (every rank's micro-batch; Qiu et al. 2025, same loss at any "
        "process count) or local (each rank's own, as transformers' aux loss)",
        ("global", "local"),
    )
    router_lr_multiplier: float = _field(1.0, "router learning rate = grpo.learning_rate x this")
    freeze_router: bool = _field(False, "do not train the routers at all")
    routing_replay: str = _field(
        "none",
        "force recorded experts in training forwards: none, old_policy (recorded in TRL's old-policy forward), "
        "rollout (recorded during generate; not with vLLM)",
        ("none", "old_policy", "rollout"),
    )
    analytics: bool = _field(True, "log routing on forking vs other tokens (MoE models)")

    def is_default(self) -> bool:
        return self == MoEConfig()


@dataclass
class WarmStartConfig:
    enabled: str = _field(
        "auto", "supervised warm start before RL: auto (only for tiny models), true, false", ("auto", "true", "false")
    )
    target_accuracy: float = _field(0.3, "stop once greedy dev accuracy reaches this (a partly right policy)")
    max_steps: int = _field(1500, "upper bound on supervised steps")
    eval_every: int = _field(50, "steps between dev-accuracy checks")
    learning_rate: float = _field(3e-3, "supervised learning rate")
    batch_size: int = _field(32, "supervised batch size")
    num_dev: int = _field(100, "dev problems used to pick the checkpoint (disjoint from the eval set)")
    cache_dir: str = _field("~/.cache/rlvr/warm_start", "where warm-started checkpoints are cached, keyed by config")
    seed: int | None = _field(None, "seed of the tiny model's init and its warm start (default: the run seed)")


@dataclass
class EvalConfig:
    enabled: bool = _field(True, "evaluate before and after training")
    sampled_completions: int = _field(4, "completions per problem for sampled accuracy (0: greedy only)")
    temperature: float = _field(1.0, "sampling temperature for sampled accuracy")
    batch_size: int = _field(64, "prompts per generation batch")
    max_new_tokens: int | None = _field(None, "generation limit (default: grpo.max_completion_length)")
    every: int = _field(0, "also evaluate every N training steps (0: only before and after)")
    pass_k: int = _field(0, "report pass@k from the sampled completions (0: off; needs k <= sampled_completions)")


@dataclass
class CompareConfig:
    arms: list = _field(
        ["full", "forking", "random", "bottom"],
        "arms to run (rlvr/configs/arms/<arm>.yaml overlays): full, forking, forking_router, hybrid, random, bottom",
    )
    seeds: list = _field([0, 1, 2], "seeds; every arm runs once per seed on the same data")


UPCYCLE_INITS = ("btx", "sparse", "scratch")


@dataclass
class UpcycleConfig:
    inits: list = _field(
        [],
        "rlvr compare: starting policies to compare (empty: the model above): btx (branches of a mix-trained "
        "dense seed "
        "trained apart per domain, merged), sparse (the seed copied into every expert), scratch (an MoE from random "
        "init); each is fine-tuned on the mix (warm_start) before RL",
    )
    dense_model: str = _field(
        "tiny:qwen3", "dense family the btx/sparse experts come from: tiny:qwen3, tiny:mistral or tiny:llama"
    )
    scratch_model: str = _field("tiny:qwen3_moe", "MoE architecture of the scratch init (a tiny:<arch> name)")
    num_experts: int = _field(2, "experts per MoE layer (btx: one per data.task.domains entry)")
    top_k: int = _field(1, "experts per token of every init")
    router_init: str = _field(
        "mean_hidden",
        "btx router init: random, zero, mean_hidden (each domain's mean hidden state)",
        ("random", "zero", "mean_hidden"),
    )
    router_samples: int = _field(64, "btx mean_hidden: training problems per domain routed through its dense model")
    branch_steps: int = _field(
        200, "btx: supervised steps of each branch on its own domain, starting from the mix-trained seed"
    )
    match_compute: bool = _field(
        True,
        "sparse: train the seed branch_steps x domains more steps on the mix first (same supervised compute as btx)",
    )


# GRPOConfig defaults that rlvr changes. Everything else is TRL's default.
GRPO_DEFAULTS: dict[str, Any] = {
    # TRL adds the MoE load-balancing loss from the model config by default; RL frameworks (verl, NeMo-RL)
    # turn it off. rlvr follows them.
    "router_aux_loss_coef": 0.0,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": False,  # transformers hides progress bars when its logging is quiet; rlvr always shows them
}


@dataclass
class RunConfig:
    output_dir: str = _field("runs/rlvr", "run directory: metrics.jsonl, summary.json, the final model")
    seed: int = _field(0, "seed for model init, data generation and training")
    arm: str = _field("", "label of the experiment arm this run belongs to (set by --arm and rlvr compare)")
    save_model: bool = _field(True, "save the final policy to <output_dir>/model")
    resume: bool = _field(
        False, "continue from the newest complete checkpoint in output_dir (save them with grpo.save_strategy=steps)"
    )
    model: ModelConfig = _field(ModelConfig, "policy")
    data: DataConfig = _field(DataConfig, "prompts and gold answers")
    reward: RewardConfig = _field(RewardConfig, "verifiable rewards")
    forking: ForkingConfig = _field(ForkingConfig, "forking-token selection (Wang et al., 2025)")
    moe: MoEConfig = _field(MoEConfig, "router-aware updates and routing analytics (MoE policies)")
    warm_start: WarmStartConfig = _field(WarmStartConfig, "supervised warm start of tiny policies")
    eval: EvalConfig = _field(EvalConfig, "held-out accuracy before/after training")
    compare: CompareConfig = _field(CompareConfig, "rlvr compare: which arms and seeds")
    upcycle: UpcycleConfig = _field(
        UpcycleConfig, "rlvr compare with starting policies built by upcycling (Branch-Train-MiX)"
    )
    grpo: dict = _field(dict, "TRL GRPOConfig fields, passed through (e.g. learning_rate, num_generations)")

    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    def warm_start_seed(self) -> int:
        return self.seed if self.warm_start.seed is None else self.warm_start.seed

    def max_completion_length(self) -> int:
        """``grpo.max_completion_length``, or TRL's default for it."""
        from trl import GRPOConfig

        default = next(f.default for f in dataclasses.fields(GRPOConfig) if f.name == "max_completion_length")
        value = self.grpo.get("max_completion_length", default)
        return int(value) if value is not None else 512

    def grpo_kwargs(self) -> dict[str, Any]:
        """GRPOConfig keyword arguments: rlvr's defaults, the config's ``grpo`` section, derived fields."""
        import torch

        kwargs = dict(GRPO_DEFAULTS) | dict(self.grpo)
        kwargs.setdefault("output_dir", self.output_dir)
        kwargs.setdefault("seed", self.seed)
        if not torch.cuda.is_available():
            # Follow the launcher's mixed precision (accelerate configs such as TRL's zero2.yaml ask for bf16,
            # and DeepSpeed refuses a mismatch); a plain CPU run stays in float32.
            kwargs.setdefault("bf16", os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16")
            kwargs.setdefault("use_cpu", True)
        return kwargs


# --------------------------------------------------------------------------------------------------
# Reading: defaults < YAML < overrides


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # "1e3" and friends, which YAML leaves as strings
            value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads true/false for enum-like strings such as warm_start.enabled
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


@functools.cache
def grpo_fields() -> frozenset[str]:
    """The field names of TRL's ``GRPOConfig``: what the ``grpo`` section (and a bare TRL flag) may set."""
    from trl import GRPOConfig

    return frozenset(f.name for f in dataclasses.fields(GRPOConfig))


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _section_types(cls).items():
        keys += _dotted_keys(tp, f"{prefix}{name}.") if _is_dataclass_type(tp) else [f"{prefix}{name}"]
    return keys


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    """An unknown key, with the closest keys of its own section, else of every section (``grpo.*`` included)."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=3)
    if not close:
        everywhere = _dotted_keys(RunConfig) + [f"grpo.{name}" for name in sorted(grpo_fields())]
        by_leaf: dict[str, list[str]] = {}
        for dotted in everywhere:
            by_leaf.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
        close = [
            d for match in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75) for d in by_leaf[match]
        ]
        close = close[:3] or difflib.get_close_matches(key, everywhere, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{key}: unknown key{hint}")


def _apply(instance: Any, values: dict, prefix: str) -> None:
    """Set nested ``values`` on a dataclass instance, coercing types and rejecting unknown keys."""
    hints = _section_types(type(instance))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints and isinstance(instance, RunConfig) and name in grpo_fields():
            instance.grpo[name] = value  # a TRL flag: --max_steps 3 is grpo.max_steps
            continue
        if name not in hints:
            raise _unknown_key(key, list(hints))
        tp = hints[name]
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(_section_types(type(current)))}")
            _apply(current, value, f"{key}.")
        elif name == "grpo" and isinstance(instance, RunConfig):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of GRPOConfig fields")
            instance.grpo.update(value)
        else:
            setattr(instance, name, _coerce(key, value, tp))


def parse_overrides(arguments: list[str]) -> dict:
    """``["--forking.rho", "0.3", "grpo.learning_rate=1e-5"]`` -> nested dict with YAML-typed values."""
    nested: dict = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if "=" in argument:
            key, _, raw = argument.lstrip("-").partition("=")
            index += 1
        elif argument.startswith("--"):
            if index + 1 >= len(arguments):
                raise ConfigError(f"{argument[2:]}: missing value")
            key, raw = argument[2:], arguments[index + 1]
            index += 2
        else:
            raise ConfigError(f"cannot read override {argument!r}; write --key value or key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 leaves 1e-5 (no dot) as a string
            value = _number(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def load_config(paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then each YAML file in order (later files overlay earlier ones), then the overrides; validated.

    Several files make an experiment arm: ``load_config(["my.yaml", "rlvr/configs/arms/full.yaml"])``.
    """
    config = RunConfig()
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(config, values, "")
    if overrides:
        _apply(config, parse_overrides(overrides), "")
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------
# Validation (before any model is built)


def _check_choices(instance: Any, prefix: str) -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}{f.name}: must be one of {', '.join(map(str, choices))}; got {value!r}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: RunConfig) -> None:
    """Raise ConfigError on the first bad value; builds nothing heavier than a GRPOConfig."""
    _check_choices(config, "")
    forking = config.forking
    _require(0.0 <= forking.rho <= 1.0, "forking.rho", f"must be in [0, 1]; got {forking.rho}")
    _require(forking.log_examples >= 0, "forking.log_examples", "must be >= 0")

    moe = config.moe
    for name in ("router_gate_outside", "expert_gate_outside"):
        _require(0.0 <= getattr(moe, name) <= 1.0, f"moe.{name}", f"must be in [0, 1]; got {getattr(moe, name)}")
    for name in ("load_balancing_coef", "z_loss_coef"):
        _require(getattr(moe, name) >= 0.0, f"moe.{name}", "must be >= 0")
    _require(
        moe.router_lr_multiplier > 0.0, "moe.router_lr_multiplier", "must be > 0 (use moe.freeze_router to freeze)"
    )
    if moe.load_balancing_coef > 0 and float(config.grpo.get("router_aux_loss_coef") or 0.0) != 0.0:
        raise ConfigError(
            "moe.load_balancing_coef: TRL's grpo.router_aux_loss_coef is also set; the load-balancing loss would be "
            "added twice. Keep one (rlvr's can be scoped to completion or forking tokens)."
        )

    if moe.routing_replay == "rollout":
        for key in ("use_vllm", "use_transformers_paged"):
            if config.grpo.get(key):
                raise ConfigError(
                    f"moe.routing_replay: 'rollout' records routing inside transformers' generate(), which "
                    f"grpo.{key} bypasses; use routing_replay=old_policy (or none) with grpo.{key}"
                )

    model = config.model
    if model.name_or_path.startswith("tiny:"):
        architecture = model.name_or_path[len("tiny:") :]
        known = sorted(ARCHITECTURES) + sorted(DENSE_ARCHITECTURES)
        _require(
            architecture in known,
            "model.name_or_path",
            f"unknown tiny architecture {architecture!r}; one of {', '.join(known)}",
        )
        tiny = model.tiny
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "expert_size", "num_experts", "top_k"):
            _require(getattr(tiny, name) >= 1, f"model.tiny.{name}", f"must be >= 1; got {getattr(tiny, name)}")
        _require(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.hidden_size", "must be divisible by num_heads")
        _require(tiny.num_heads % tiny.num_kv_heads == 0, "model.tiny.num_kv_heads", "must divide num_heads")
        _require(tiny.top_k <= tiny.num_experts, "model.tiny.top_k", "must be <= num_experts")

    data = config.data
    _require(data.num_train >= 0, "data.num_train", "must be >= 0")
    _require(data.num_eval >= 0, "data.num_eval", "must be >= 0")
    if data.source == "arithmetic":
        _require(data.num_train > 0, "data.num_train", "must be > 0 for the embedded task")
        try:
            data.task.validate()
        except ValueError as error:
            raise ConfigError(f"data.task: {error}") from None

    reward = config.reward
    _require(len(reward.functions) > 0, "reward.functions", "needs at least one reward function")
    from rlvr.rewards.registry import check_reward_name

    for index, name in enumerate(reward.functions):
        try:
            check_reward_name(str(name))
        except ValueError as error:
            raise ConfigError(f"reward.functions[{index}]: {error}") from None
    _require(reward.budget_seconds > 0, "reward.budget_seconds", "must be > 0")
    _require(reward.workers >= 0, "reward.workers", "must be >= 0")
    _require(reward.overlong_buffer >= 0, "reward.overlong_buffer", "must be >= 0")
    _require(reward.float_rounding >= 0, "reward.float_rounding", "must be >= 0")
    _require(reward.numeric_precision >= 1, "reward.numeric_precision", "must be >= 1")
    from rlvr.rewards.extraction import FALLBACKS

    for index, fallback in enumerate(reward.fallbacks):
        _require(
            fallback in FALLBACKS,
            f"reward.fallbacks[{index}]",
            f"must be one of {', '.join(FALLBACKS)}; got {fallback!r}",
        )
    max_completion_length = config.max_completion_length()
    _require(
        reward.overlong_buffer <= max_completion_length,
        "reward.overlong_buffer",
        f"must be <= grpo.max_completion_length ({max_completion_length})",
    )
    if reward.weights is not None:
        _require(
            len(reward.weights) == len(reward.functions),
            "reward.weights",
            f"needs {len(reward.functions)} weights (one per function); got {len(reward.weights)}",
        )

    warm = config.warm_start
    _require(0.0 < warm.target_accuracy <= 1.0, "warm_start.target_accuracy", "must be in (0, 1]")
    for name in ("max_steps", "eval_every", "batch_size", "num_dev"):
        _require(getattr(warm, name) >= 1, f"warm_start.{name}", "must be >= 1")
    if warm.enabled == "true":
        _require(data.source == "arithmetic", "warm_start.enabled", "needs the embedded task's worked solutions")

    _require(config.eval.sampled_completions >= 0, "eval.sampled_completions", "must be >= 0")
    _require(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _require(config.eval.every >= 0, "eval.every", "must be >= 0")
    _require(
        0 <= config.eval.pass_k <= config.eval.sampled_completions,
        "eval.pass_k",
        f"must be between 0 and eval.sampled_completions ({config.eval.sampled_completions})",
    )

    for index, seed in enumerate(config.compare.seeds):
        _require(
            isinstance(seed, int) and not isinstance(seed, bool),
            f"compare.seeds[{index}]",
            f"must be an integer; got {seed!r}",
        )
    _require(len(config.compare.arms) > 0, "compare.arms", "needs at least one arm")
    _require(len(set(map(str, config.compare.arms))) == len(config.compare.arms), "compare.arms", "lists an arm twice")

    _validate_upcycle(config)
    _validate_grpo(config)


def _validate_upcycle(config: RunConfig) -> None:
    upcycle = config.upcycle
    for index, init in enumerate(upcycle.inits):
        _require(
            init in UPCYCLE_INITS, f"upcycle.inits[{index}]", f"must be one of {', '.join(UPCYCLE_INITS)}; got {init!r}"
        )
    _require(len(set(upcycle.inits)) == len(upcycle.inits), "upcycle.inits", "lists an init twice")
    if not upcycle.inits:
        return
    _require(config.data.source == "arithmetic", "upcycle.inits", "needs the embedded task (its domains)")
    dense = upcycle.dense_model[len("tiny:") :] if upcycle.dense_model.startswith("tiny:") else None
    _require(
        dense in DENSE_ARCHITECTURES,
        "upcycle.dense_model",
        f"must be one of {', '.join('tiny:' + a for a in sorted(DENSE_ARCHITECTURES))}",
    )
    scratch = upcycle.scratch_model[len("tiny:") :] if upcycle.scratch_model.startswith("tiny:") else None
    _require(
        scratch in ARCHITECTURES,
        "upcycle.scratch_model",
        f"must be one of {', '.join('tiny:' + a for a in sorted(ARCHITECTURES))}",
    )
    _require(
        1 <= upcycle.top_k <= upcycle.num_experts,
        "upcycle.top_k",
        f"must be in 1..upcycle.num_experts ({upcycle.num_experts})",
    )
    _require(upcycle.router_samples >= 1, "upcycle.router_samples", "must be >= 1")
    _require(upcycle.branch_steps >= 1, "upcycle.branch_steps", "must be >= 1")
    if "btx" in upcycle.inits:
        domains = len(config.data.task.domains)
        _require(domains >= 2, "data.task.domains", "btx needs at least two domains (one dense expert each)")
        _require(
            upcycle.num_experts == domains, "upcycle.num_experts", f"btx makes one expert per domain: must be {domains}"
        )


def _validate_grpo(config: RunConfig) -> None:
    from trl import GRPOConfig

    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    hints = typing.get_type_hints(GRPOConfig)
    for key, value in list(config.grpo.items()):
        if key not in known:
            raise _unknown_key(f"grpo.{key}", sorted(known))
        if hints.get(key) in (int, float, bool, int | None, float | None, bool | None):
            config.grpo[key] = _coerce(f"grpo.{key}", value, hints[key])
    if "top_entropy_quantile" in config.grpo:
        raise ConfigError(
            "grpo.top_entropy_quantile: use forking.rho; rlvr replaces TRL's quantile threshold with an exact top-k"
        )
    try:
        with warnings.catch_warnings():  # TRL/transformers deprecation notices are not the user's concern here
            warnings.simplefilter("ignore")
            GRPOConfig(**config.grpo_kwargs())
    except (ValueError, TypeError) as error:
        raise ConfigError(f"grpo: {error}") from None
    if config.forking.mask_entropy_bonus is False and config.grpo.get("use_adaptive_entropy"):
        raise ConfigError("forking.mask_entropy_bonus: false is not supported with grpo.use_adaptive_entropy")


# --------------------------------------------------------------------------------------------------
# Help


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every leaf field, in declaration order."""
    rows = []
    hints = _section_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "grpo" and cls is RunConfig:
            default = GRPO_DEFAULTS
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" [{'|'.join(map(str, f.metadata['choices']))}]"
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((f"{prefix}{f.name}", shown, help_text))
    return rows


def format_help() -> str:
    rows = describe_fields()
    width = max(len(key) for key, _, _ in rows) + 2
    lines = []
    section = None
    for key, default, help_text in rows:
        head = key.split(".")[0] if "." in key else "run"
        if head != section:
            lines.append(f"\n  [{head}]")
            section = head
        lines.append(f"  --{key.ljust(width)}{help_text} (default: {default})")
    return "\n".join(lines)
