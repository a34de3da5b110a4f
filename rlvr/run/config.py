"""The run config: one YAML file of sections, each defined next to the code it configures.

===============  ==========================================  =======================================
section          what it sets                                defined in
===============  ==========================================  =======================================
``model``        the policy                                  :class:`rlvr.models.loading.ModelConfig`
``data``         prompts and gold answers                    :class:`rlvr.data.loader.DataConfig`
``reward``       verifiable rewards                          :class:`rlvr.rewards.registry.RewardConfig`
``forking``      forking-token selection                     :class:`rlvr.forking.selection.ForkingConfig`
``moe``          router-aware updates                        :class:`rlvr.moe.config.MoEConfig`
``rollout``      how training completions are sampled        :class:`rlvr.rollouts.config.RolloutConfig`
``prompts``      which prompts a step spends generation on   :class:`rlvr.prompts.config.PromptsConfig`
``token_rules``  an entropy intervention in the loss         :class:`rlvr.forking.token_rules.TokenRulesConfig`
``peft``         adapters: LoRA or singular-value vectors    :class:`rlvr.tuning.config.AdapterConfig`
``warm_start``   supervised warm start of tiny policies      :class:`rlvr.run.warm_start.WarmStartConfig`
``eval``         held-out accuracy                           :class:`rlvr.run.evaluation.EvalConfig`
``grpo``         TRL ``GRPOConfig`` fields, passed through   TRL
===============  ==========================================  =======================================

Reading, coercion, overrides and help are :mod:`rlvr.utils.options`'s (it knows no section). Each
section validates its own fields; :meth:`RunConfig.validate` holds the rules that tie two sections
together, and builds a ``GRPOConfig`` so that TRL's own checks run before any model is built.

The run config knows one run. Experiments own configs that compose it with their own sections, as
torchtune's recipes own theirs: ``rlvr compare`` reads :class:`rlvr.experiment.compare.ExperimentConfig`
(``compare`` and ``upcycle`` beside these sections). A section's code takes its own section and the
values it needs (e.g. :meth:`RunConfig.warm_start_job`), never the whole run config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlvr.data.loader import DataConfig
from rlvr.forking.selection import ForkingConfig, loss_normalization_unit
from rlvr.forking.token_rules import TokenRulesConfig
from rlvr.models import is_tiny
from rlvr.models.loading import ModelConfig
from rlvr.models.parallel import ParallelConfig, check_launch, world_size
from rlvr.moe.config import MoEConfig
from rlvr.prompts.config import PromptsConfig
from rlvr.rewards.registry import RewardConfig
from rlvr.rollouts.config import RolloutConfig
from rlvr.run.evaluation import EvalConfig
from rlvr.run.warm_start import WarmStartConfig, WarmStartJob, launcher_bf16
from rlvr.training.token_rule_step import check_token_rules
from rlvr.tuning.config import AdapterConfig
from rlvr.utils.options import (
    ConfigError,
    coerce,
    option,
    parse_overrides,
    passthrough,
    read_layers,
    require,
    to_dict,
    validate_tree,
)
from rlvr.utils.options import format_help as _format_help

__all__ = [
    "ConfigError",
    "ForkingConfig",
    "MoEConfig",
    "RunConfig",
    "format_help",
    "load_config",
    "parse_overrides",
    "to_dict",
]

# GRPOConfig defaults that rlvr changes. Everything else is TRL's default.
GRPO_DEFAULTS: dict[str, Any] = {
    # TRL adds the MoE load-balancing loss from the model config by default; RL frameworks (verl, NeMo-RL)
    # turn it off. rlvr follows them.
    "router_aux_loss_coef": 0.0,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": False,  # transformers hides progress bars when its logging is quiet; rlvr always shows them
}


@functools.cache
def grpo_fields() -> frozenset[str]:
    """The field names of TRL's ``GRPOConfig``: what the ``grpo`` section (and a bare TRL flag) may set."""
    from trl import GRPOConfig

    return frozenset(f.name for f in dataclasses.fields(GRPOConfig))


@dataclass
class RunConfig:
    output_dir: str = option("runs/rlvr", "run directory: metrics.jsonl, summary.json, the final model")
    seed: int = option(0, "seed for model init, data generation and training")
    arm: str = option("", "label of the experiment arm this run belongs to (set by --arm and rlvr compare)")
    save_model: bool = option(True, "save the final policy to <output_dir>/model")
    resume: bool = option(
        False, "continue from the newest complete checkpoint in output_dir (save them with grpo.save_strategy=steps)"
    )
    model: ModelConfig = option(ModelConfig, "policy")
    data: DataConfig = option(DataConfig, "prompts and gold answers")
    reward: RewardConfig = option(RewardConfig, "verifiable rewards")
    forking: ForkingConfig = option(ForkingConfig, "forking-token selection (Wang et al., 2025)")
    moe: MoEConfig = option(MoEConfig, "router-aware updates and routing analytics (MoE policies)")
    rollout: RolloutConfig = option(RolloutConfig, "how training completions are sampled: i.i.d. or forking trees")
    prompts: PromptsConfig = option(
        PromptsConfig, "which prompts a step spends generation on: all (TRL's), or dynamic sampling"
    )
    token_rules: TokenRulesConfig = option(
        TokenRulesConfig, "an entropy intervention in the loss: Clip-Cov, KL-Cov or entropy advantage shaping"
    )
    peft: AdapterConfig = option(
        AdapterConfig, "adapters instead of full fine-tuning: LoRA (experts included) or SVF (Transformer²)"
    )
    parallel: ParallelConfig = option(
        ParallelConfig, "expert parallelism instead of DeepSpeed ZeRO (launch with rlvr launch --ep N)"
    )
    warm_start: WarmStartConfig = option(WarmStartConfig, "supervised warm start of tiny policies")
    eval: EvalConfig = option(EvalConfig, "held-out accuracy before/after training")
    grpo: dict = passthrough(
        grpo_fields,
        "TRL GRPOConfig fields, passed through (e.g. learning_rate, num_generations)",
        shown_default=GRPO_DEFAULTS,
    )

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

    def warm_start_job(self) -> WarmStartJob:
        """The ``warm_start`` section with the values of this run that a warm start needs."""
        return WarmStartJob(
            settings=self.warm_start,
            model_name=self.model.name_or_path,
            tiny=dataclasses.asdict(self.model.tiny),
            task=self.data.task,
            num_train=self.warm_start.num_train or self.data.num_train,
            chat=self.data.chat,
            system_prompt=self.data.system_prompt,
            seed=self.warm_start_seed(),
            data_seed=self.data_seed(),
            max_new_tokens=self.max_completion_length(),
            configured_completion_length=self.grpo.get("max_completion_length"),
            eval_batch_size=self.eval.batch_size,
            use_cpu=bool(self.grpo_kwargs().get("use_cpu", False)),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),  # set by torchrun / accelerate launch
        )

    def grpo_kwargs(self) -> dict[str, Any]:
        """GRPOConfig keyword arguments: rlvr's defaults, the config's ``grpo`` section, derived fields."""
        import torch

        kwargs = dict(GRPO_DEFAULTS) | dict(self.grpo)
        kwargs.setdefault("output_dir", self.output_dir)
        kwargs.setdefault("seed", self.seed)
        if not torch.cuda.is_available():
            # Follow the launcher's mixed precision (accelerate configs such as TRL's zero2.yaml ask for bf16,
            # and DeepSpeed refuses a mismatch); a plain CPU run stays in float32.
            kwargs.setdefault("bf16", launcher_bf16())
            kwargs.setdefault("use_cpu", True)
        return kwargs

    def validate(self) -> None:
        """The rules that tie sections together (each section has checked its own fields)."""
        arguments = self._validate_grpo()
        grpo = self.grpo
        self._validate_rollout(arguments)
        if self.moe.load_balancing_coef > 0 and float(grpo.get("router_aux_loss_coef") or 0.0) != 0.0:
            raise ConfigError(
                "moe.load_balancing_coef: TRL's grpo.router_aux_loss_coef is also set; the load-balancing loss would "
                "be added twice. Keep one (rlvr's can be scoped to completion or forking tokens)."
            )
        if self.moe.routing_replay == "rollout" and grpo.get("use_transformers_paged"):
            raise ConfigError(
                "moe.routing_replay: 'rollout' replays the experts the sampler chose, which paged generation "
                "(grpo.use_transformers_paged) does not return; use routing_replay=old_policy (or none) with it"
            )
        if self.token_rules.rule != "none":
            check_token_rules(self.token_rules, self.forking, arguments)
        if self.forking.mask_entropy_bonus is False and grpo.get("use_adaptive_entropy"):
            raise ConfigError("forking.mask_entropy_bonus: false is not supported with grpo.use_adaptive_entropy")
        max_completion_length = self.max_completion_length()
        require(
            self.reward.overlong_buffer <= max_completion_length,
            "reward.overlong_buffer",
            f"must be <= grpo.max_completion_length ({max_completion_length})",
        )
        if self.peft.enabled and self.moe.freeze_router and self.peft.routers == "train":
            raise ConfigError("moe.freeze_router: true, but peft.routers is 'train'; set peft.routers=freeze")
        if self.warm_start.enabled == "true":
            require(self.data.embedded, "warm_start.enabled", "needs the embedded task's worked solutions")
        if self.parallel.enabled:
            self._validate_expert_parallel()
        warm_starts = self.warm_start.enabled == "true" or (
            self.warm_start.enabled == "auto" and is_tiny(self.model.name_or_path)
        )
        if warm_starts and self.warm_start.num_train is None and self.data.num_train == 0:
            raise ConfigError(
                "warm_start.num_train: the warm start trains on data.num_train worked problems of the embedded task, "
                "and data.num_train is 0 (all rows of the data source); set warm_start.num_train (e.g. 2000) or "
                "warm_start.enabled=false"
            )

    def check_launch(self) -> None:
        """The processes of this launch can run the config (expert parallelism needs ``ep_size`` of them, and no
        DeepSpeed): checked when a run starts, before any model is built; a config alone (to plan or inspect
        a recipe) loads anywhere."""
        if self.parallel.enabled:
            try:
                check_launch(self.parallel, world_size())
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def _validate_expert_parallel(self) -> None:
        """What an expert-parallel run cannot do yet, refused with the config (the launch is checked when the run
        starts, :meth:`check_launch`; the model's own checks come when it loads)."""
        unsupported = {  # key -> why not
            "peft.method": (self.peft.enabled, "adapters on experts a rank holds only a shard of are not built yet"),
            "rollout.engine=copy": (
                self.rollout.engine == "copy",
                "the copy engine keeps a whole copy of the policy on every rank, which expert parallelism avoids",
            ),
            "resume": (
                self.resume,
                "transformers saves a model sharded at load without its optimizer state (save_only_model)",
            ),
            "grpo.save_strategy": (
                self.grpo.get("save_strategy", "no") != "no",
                "checkpoints of a model sharded at load cannot be resumed; the final model is saved whole",
            ),
        }
        for key, (on, why) in unsupported.items():
            if on:
                raise ConfigError(
                    f"parallel.ep_size={self.parallel.ep_size}: {key} is not supported with expert parallelism yet: "
                    f"{why} (see the README's expert-parallelism section)"
                )

    def _validate_rollout(self, arguments) -> None:
        """Forking trees: G leaves per prompt from (1 + branches) per root, whole groups on each process; the copy
        engine: not with another sampler."""
        unsupported = [f"grpo.{key}" for key in ("use_vllm", "use_transformers_paged") if self.grpo.get(key)]
        rows = arguments.per_device_train_batch_size * arguments.steps_per_generation
        try:
            self.rollout.check_run(arguments.num_generations, rows, unsupported)
            self.rollout.check_engine(unsupported)
            correction = arguments.vllm_importance_sampling_correction
            self.rollout.check_loss(
                arguments.loss_type,
                arguments.off_policy_mask_threshold is not None,
                arguments.vllm_importance_sampling_mode if correction else None,
            )
        except ValueError as error:
            raise ConfigError(f"rollout.{error}") from None

    def _validate_grpo(self):
        from trl import GRPOConfig

        hints = typing.get_type_hints(GRPOConfig)
        for key, value in list(self.grpo.items()):
            if hints.get(key) in (int, float, bool, int | None, float | None, bool | None):
                self.grpo[key] = coerce(f"grpo.{key}", value, hints[key])
        if "top_entropy_quantile" in self.grpo:
            raise ConfigError(
                "grpo.top_entropy_quantile: use forking.rho; rlvr replaces TRL's quantile threshold with an exact top-k"
            )
        try:
            with warnings.catch_warnings():  # TRL/transformers deprecation notices are not the user's concern here
                warnings.simplefilter("ignore")
                arguments = GRPOConfig(**self.grpo_kwargs())
        except (ValueError, TypeError) as error:
            raise ConfigError(f"grpo: {error}") from None
        loss_normalization_unit(arguments.loss_type)
        return arguments


def load_config(
    paths: str | Path | list[str | Path] | None = None,
    overrides: list[str] | None = None,
    schema: type[RunConfig] = RunConfig,
) -> RunConfig:
    """Defaults, then each YAML file in order (later files overlay earlier ones), then the overrides; validated.

    Several files make an experiment arm: ``load_config(["my.yaml", "rlvr/configs/arms/full.yaml"])``.
    ``schema``: the config class read, ``RunConfig`` or an experiment's config that extends it.
    """
    config = read_layers(schema(), paths, overrides)
    validate_tree(config)
    return config


def format_help(schema: type[RunConfig] = RunConfig) -> str:
    """Every key of the config with its default and one-line help (``rlvr train --help``)."""
    return _format_help(schema)
