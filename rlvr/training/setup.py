"""What ``ForkingGRPOTrainer`` builds or decides once: adapters, router-aware updates, the rollout checks, the
engine behind TRL's vLLM interface and what its weight sync sends, the LM-head choice, the routers' learning
rate, and checkpoint loads.

Each function reads the TRL trainer it is given (its settings as TRL resolved them) and returns what it
built; none of them is called per step.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor

from rlvr.forking.token_rules import STOPPING_RULES
from rlvr.models.parallel import sync_full_tensors
from rlvr.moe import UnknownMoEArchitecture
from rlvr.moe.updates import RouterAwareUpdates
from rlvr.rollouts import ReplayRecorder, Rollouts
from rlvr.rollouts.copy_engine import CopyEngine, CopyEngineGeneration
from rlvr.rollouts.tree import left_pad
from rlvr.training.callbacks import PromptFilterState, PromptHistoryState, PromptProbeState
from rlvr.training.prompt_filter import PromptFilter
from rlvr.training.sparse_head import HeadTransform, add_sparse_head_route, sparse_head_blockers
from rlvr.training.token_rule_step import TokenRuleStep, check_token_rules
from rlvr.training.vllm_routing import VLLMRoutedExperts
from rlvr.tuning import SVFConfig, apply_svf, load_svf, merged, save_svf, svf_state
from rlvr.tuning.loading import is_adapter_directory
from rlvr.tuning.svf import has_svf, is_svf_directory
from rlvr.utils.options import ConfigError

logger = logging.getLogger(__name__)


def entropy_mask_switch(trainer) -> float:
    """The ``top_entropy_quantile`` to give TRL: it calls ``get_high_entropy_mask`` only when the value is below
    1, and rlvr's override ignores the quantile (``forking.rho`` replaces it), so 0.0 turns the forking-token
    weights on and 1.0 leaves every token to the loss. A user's own value below 1 is refused."""
    if trainer.top_entropy_quantile < 1.0:
        raise ValueError(
            "ForkingGRPOTrainer replaces GRPOConfig.top_entropy_quantile with an exact top-k: pass "
            "forking=ForkingConfig(rho=...) and leave top_entropy_quantile at 1.0"
        )
    weighted = trainer.forking.policy_tokens == "forking" or trainer.token_rules.rule in STOPPING_RULES
    return 0.0 if weighted else 1.0


def zero3(trainer) -> bool:
    """Whether the trainer runs under DeepSpeed ZeRO-3 (parameters partitioned across ranks)."""
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def adapters(model, peft_config):
    """What TRL gets as ``peft_config``: a PEFT config unchanged (TRL wraps the policy), None for SVF, which is
    applied to the policy here (:func:`rlvr.tuning.apply_svf`)."""
    if not isinstance(peft_config, SVFConfig):
        return peft_config
    if not isinstance(model, torch.nn.Module):
        raise ValueError("peft_config=SVFConfig(...) needs the policy as a model instance, not a model id")
    apply_svf(model, peft_config)
    return None


def engine_weight_sync(trainer) -> None:
    """What an inference engine receives on TRL's weight sync: an SVF policy's merged weights
    (:func:`sync_merged_weights`), an expert-parallel policy's sharded weights whole
    (:func:`rlvr.models.parallel.sync_full_tensors`)."""
    sync_merged_weights(trainer)
    generation = getattr(trainer, "vllm_generation", None)
    if hasattr(generation, "_iter_named_params") and any(
        isinstance(p, DTensor) for p in trainer.accelerator.unwrap_model(trainer.model).parameters()
    ):
        sync_full_tensors(generation)


def sync_merged_weights(trainer) -> None:
    """An SVF policy sends its merged weights (``W + U diag(s dz) V^T``, under the base model's names) wherever
    TRL syncs weights to an inference engine (vLLM, or rlvr's copy engine behind the same interface)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    generation = getattr(trainer, "vllm_generation", None)
    if not has_svf(policy) or generation is None:
        return
    if isinstance(generation, CopyEngineGeneration):
        return  # the copy engine folds adapters in itself
    if zero3(trainer):
        raise ValueError(
            "peft.method=svf: syncing merged weights to vLLM under DeepSpeed ZeRO-3 is not supported (the merge "
            "needs every targeted matrix whole); use ZeRO-2, or peft.method=lora (TRL merges its adapters)"
        )
    sync = generation.sync_weights

    def sync_weights(*args, **kwargs):
        with merged(trainer.accelerator.unwrap_model(trainer.model)):
            return sync(*args, **kwargs)

    generation.sync_weights = sync_weights


def gathered_svf_state(trainer) -> dict | None:
    """An SVF policy's vectors and trained routers gathered on every rank under ZeRO-3 (every rank saves a model,
    but only the main process writes: transformers gives it an empty state dict unless 16-bit gathering is on);
    None for any other policy or launch."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if not (has_svf(policy) and zero3(trainer)):
        return None
    return svf_state(policy)


def save_svf_policy(trainer, output_dir: str, state_dict: dict | None) -> bool:
    """Save an SVF policy as its vectors (and trained routers) with the tokenizer; False for any other policy."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if not has_svf(policy):
        return False
    if trainer.args.should_save:
        save_svf(policy, output_dir, state_dict)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
    return True


def undo_forced_reentrant(trainer, asked: bool | None) -> None:
    """TRL forces reentrant activation checkpointing for PEFT policies under ZeRO-3 (trl#6356): DeepSpeed used to
    partition frozen parameters during a non-reentrant recompute (deepspeedai/DeepSpeed#4332). DeepSpeed releases
    with the fix (#8148: frozen parameters kept whole through a recompute) do not need it, and rlvr's recorded
    routing needs the non-reentrant kind; there it is restored unless the user asked for reentrant."""
    args = trainer.args
    kwargs = args.gradient_checkpointing_kwargs or {}
    if asked is not None or not (args.gradient_checkpointing and kwargs.get("use_reentrant")):
        return
    if not (trainer.is_deepspeed_enabled and is_peft_model(trainer.model)):
        return
    from deepspeed.runtime.zero import partitioned_param_coordinator

    if hasattr(partitioned_param_coordinator, "update_recompute_parameters"):  # DeepSpeed's fix is installed
        for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):  # transformers' alias
            if hasattr(args, name):
                setattr(args, name, {**(getattr(args, name) or {}), "use_reentrant": False})


def router_aware_updates(trainer) -> RouterAwareUpdates | None:
    """Gates, router losses and analytics of an MoE policy (routers frozen if asked); None for a dense policy
    with default ``moe`` settings. Refuses the settings the recorded routing cannot run with."""
    moe, args = trainer.moe, trainer.args
    try:
        updates = RouterAwareUpdates(
            trainer.model, moe, sum_across_ranks=trainer.collectives.sum, world_size=trainer.accelerator.num_processes
        )
    except UnknownMoEArchitecture:
        if not moe.is_default():
            raise
        return None  # a dense policy: nothing to route
    if moe.freeze_router:
        updates.freeze_routers()
    reentrant = args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if reentrant and moe.needs_recorded_routing():
        raise ValueError(
            "rlvr.moe gates, router losses and routing replay need "
            "gradient_checkpointing_kwargs.use_reentrant=False "
            "(TRL's default): reentrant checkpointing re-runs the forward in backward without the recorded routing"
        )
    if moe.routing_replay == "rollout" and getattr(trainer, "use_transformers_continuous_batching", False):
        raise ValueError(
            "moe.routing_replay='rollout' replays the experts the sampler chose, which paged generation does not "
            "return; use routing_replay='old_policy' or 'none'"
        )
    return updates


def rlvr_defaults(args, moe):
    """The ``GRPOConfig`` a user hands the trainer, with rlvr's default where TRL's is left unset:
    ``router_aux_loss_coef`` None makes TRL add the model's own load-balancing loss (0.001 for Qwen3-MoE) over
    every token, beside rlvr's token-scoped router losses; rlvr sets it to 0, as its YAML path does and as verl
    and NeMo-RL do in RL, on the config object itself. A number set by the user is kept (refused beside
    ``moe.load_balancing_coef``, which would add the same loss twice)."""
    if args is None or not hasattr(args, "router_aux_loss_coef"):
        return args
    if args.router_aux_loss_coef is None:
        args.router_aux_loss_coef = 0.0
        logger.info("GRPOConfig.router_aux_loss_coef unset: rlvr uses 0.0 (set a number to keep TRL's aux loss)")
    elif args.router_aux_loss_coef and moe.load_balancing_coef > 0:
        raise ValueError(
            "moe.load_balancing_coef: GRPOConfig.router_aux_loss_coef is also set; the load-balancing loss would "
            "be added twice. Keep one (rlvr's can be scoped to completion or forking tokens)."
        )
    return args


def rollouts(trainer, measure: bool) -> Rollouts:
    """The generation side of ``trainer`` (:class:`rlvr.rollouts.Rollouts`): routing recorded for the replay
    ``moe.routing_replay`` asks for (and for the mismatch metrics when ``measure``: an engine samples)."""
    updates = trainer.router_updates
    sampler = Rollouts(
        ReplayRecorder(
            updates.hooks if updates is not None else None,
            trainer.moe.routing_replay if updates is not None else "none",
            measure=measure,
        ),
        trainer.rollout,
        eos_token_ids=trainer.eos_token_ids,
        pad_token_id=trainer._tokenizer.pad_token_id,
        sum_across_ranks=trainer.collectives.sum,
        gather=trainer.collectives.gather_rows,
    )
    sampler.solved_reward = trainer.prompts.solved_reward
    sampler.aggregation = trainer.args.multi_objective_aggregation
    return sampler


def token_rule_step(trainer) -> TokenRuleStep | None:
    """The entropy intervention ``token_rules.rule`` asks for (None: ``none``), after refusing what it cannot
    run with."""
    if trainer.token_rules.rule == "none":
        return None
    check_token_rules(trainer.token_rules, trainer.forking, trainer.args)
    return TokenRuleStep(trainer)


def prompt_filter(trainer) -> PromptFilter | None:
    """The prompt choice ``prompts.filter`` asks for (None: TRL's batches)."""
    if trainer.prompts.filter == "none":
        return None
    args = trainer.args
    rows = args.per_device_train_batch_size * args.steps_per_generation
    if rows % trainer.num_generations:
        raise ValueError(
            f"prompts.filter keeps whole groups on each process: per_device_train_batch_size x "
            f"steps_per_generation ({rows}) must be a multiple of num_generations ({trainer.num_generations})"
        )
    accelerator = trainer.accelerator
    dataset, groups = trainer.train_dataset, rows // trainer.num_generations * accelerator.num_processes
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"prompts.filter={trainer.prompts.filter} draws prompts by index: the training set must be a map-style "
            f"dataset (got {type(dataset).__name__})"
        )
    if len(dataset) < groups:
        raise ValueError(
            f"prompts.filter={trainer.prompts.filter}: the training set has {len(dataset)} prompts, fewer than the "
            f"{groups} groups of one generation batch, so no batch of distinct informative groups can be filled: "
            "use more prompts (data.num_train) or fewer per batch (per_device_train_batch_size)"
        )
    chooser = PromptFilter(
        trainer.prompts,
        trainer.collectives,
        trainer.train_dataset,
        trainer.num_generations,
        int(args.seed),
        accelerator.process_index,
        accelerator.num_processes,
        trainer._tokenizer.pad_token_id,
        featurize=lambda rows: prompt_features(trainer, rows),
        hidden_size=trainer.model.config.get_text_config().hidden_size,
    )
    # kept in checkpoints: a resumed run draws and skips what the uninterrupted one would
    trainer.add_callback(PromptFilterState(chooser))
    if chooser.history is not None:
        trainer.add_callback(PromptHistoryState(chooser.history))
    if chooser.probe is not None:
        trainer.add_callback(PromptProbeState(chooser.probe))
    return chooser


@torch.no_grad()
def prompt_features(trainer, rows: list[dict]) -> torch.Tensor:
    """(N, H) mean of the policy's last hidden states over each row's prompt tokens, tokenized as TRL tokenizes
    prompts for generation: the probe's view of a prompt (one forward of the prompt, no completion)."""
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    input_ids, mask = left_pad(prompt_ids, trainer._tokenizer.pad_token_id)  # (N, P)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    backbone = getattr(policy, "get_base_model", lambda: policy)().base_model  # PEFT: adapters stay active
    device = trainer.accelerator.device
    hidden = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (N, P, H)
    weights = mask.to(device=device, dtype=hidden.dtype).unsqueeze(-1)  # (N, P, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def check_rollout(trainer) -> None:
    """What ``rollout.mode=forking_tree`` and ``rollout.engine=copy`` cannot run with, as one-line errors."""
    args = trainer.args
    active = {
        "use_vllm": args.use_vllm,  # the setting: the copy engine runs TRL's vLLM path
        "use_transformers_paged": getattr(trainer, "use_transformers_continuous_batching", False),
        "tools": bool(trainer.tools),
        "rollout_func": trainer.rollout_func is not None,
    }
    rows = args.per_device_train_batch_size * args.steps_per_generation
    rollout = trainer.rollout
    try:
        rollout.check_run(trainer.num_generations, rows, [name for name, on in active.items() if on])
        rollout.check_engine([name for name, on in {**active, "DeepSpeed ZeRO-3": zero3(trainer)}.items() if on])
        correction = trainer.vllm_importance_sampling_correction
        rollout.check_loss(
            trainer.loss_type,
            trainer.off_policy_mask_threshold is not None,
            trainer.vllm_importance_sampling_mode if correction else None,
        )
    except ValueError as error:
        raise ValueError(f"rollout.{error}") from None


def attach_engine(trainer, measure_forward) -> None:
    """Sampling with numerics of the engine's own: the copy engine (``rollout.engine=copy``) behind TRL's
    vLLM generator interface, so TRL's vLLM path (weight sync after optimizer steps, sampling log-probs,
    importance-sampling correction) runs on it unchanged; or TRL's vLLM with its routed experts kept.
    Either way each batch's mismatch is measured (``mismatch/*``, with ``measure_forward`` when TRL runs no
    old-policy forward)."""
    rollout, accelerator = trainer.rollout, trainer.accelerator
    if rollout.engine == "copy":
        policy = accelerator.unwrap_model(trainer.model)
        dtype = next(policy.parameters()).dtype if rollout.dtype == "auto" else getattr(torch, rollout.dtype)
        seed = int(trainer.args.seed) * 1009 + accelerator.process_index
        engine = CopyEngine(policy, dtype, rollout.router_noise, seed=seed)
        trainer.vllm_generation = CopyEngineGeneration(
            engine,
            lambda: accelerator.unwrap_model(trainer.model),
            trainer.generation_config,
            trainer._tokenizer.pad_token_id,
            trainer.eos_token_ids,
        )
        trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, "colocate", -1  # TRL's vLLM path
        routed = trainer.vllm_generation
    else:
        routed = VLLMRoutedExperts(
            trainer.vllm_generation,
            accelerator.process_index,
            accelerator.num_processes,
            broadcast=trainer.collectives.broadcast_objects,
        )
    correction = None
    if trainer.vllm_importance_sampling_correction:
        correction = (
            trainer.vllm_importance_sampling_mode,
            trainer.vllm_importance_sampling_clip_min,
            trainer.vllm_importance_sampling_clip_max,
        )
    trainer.rollouts.attach_engine(routed, measure_forward, correction)


def sparse_head_transform(trainer) -> HeadTransform | None:
    """The logit transform when the loss forward projects only the forking tokens through the LM head with
    gradient (:mod:`rlvr.training.sparse_head`; the model gets that route), or None: only where that gives TRL's
    gradient exactly. Logs the reason once."""
    setting = trainer.forking.sparse_lm_head
    blockers = sparse_head_blockers(trainer)
    if setting == "false":
        blockers = ["forking.sparse_lm_head=false"]
    elif setting == "true" and blockers:
        raise ConfigError(f"forking.sparse_lm_head: true, but it would not be exact: {'; '.join(blockers)}")
    main = trainer.accelerator.is_main_process
    if blockers:
        if main:
            logger.info("LM head: TRL's fused head on every token (%s)", "; ".join(blockers))
        return None
    add_sparse_head_route(trainer.model)
    if main:
        logger.info("LM head: backward on the forking tokens only (rlvr.training.sparse_head)")
    return HeadTransform.of(trainer.model.config, trainer.temperature)


def router_groups(optimizer: torch.optim.Optimizer, updates: RouterAwareUpdates, lr_multiplier: float):
    """``optimizer`` with the router parameters moved to groups of their own at ``lr x lr_multiplier``."""
    router_ids = {id(p) for p in updates.router_parameters()}
    for group in list(optimizer.param_groups):
        routers = [p for p in group["params"] if id(p) in router_ids]
        if not routers:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in router_ids]
        optimizer.add_param_group({**group, "params": routers, "lr": group["lr"] * lr_multiplier})
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
    return optimizer


def load_full_checkpoint(model, directory: str) -> bool:
    """Load a full checkpoint through ``from_pretrained`` into ``model`` (or SVF vectors into an SVF policy);
    False when ``directory`` holds no full model (the Trainer's own resume path then applies: PEFT adapters).

    transformers 5 saves fused MoE experts in the per-expert hub layout and converts them back when loading
    through ``from_pretrained``; the Trainer's own resume path loads the raw state dict with ``strict=False``
    and silently leaves every expert at its initial weights.
    """
    if is_svf_directory(directory):
        load_svf(model, directory)
        return True
    if is_adapter_directory(directory):
        return False  # PEFT's adapter: the Trainer's own resume path loads it
    has_full_model = os.path.isfile(os.path.join(directory, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(directory)
    )
    if not has_full_model or not hasattr(type(model), "from_pretrained"):
        return False
    loaded = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return True
