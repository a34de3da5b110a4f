"""ForkingGRPOTrainer: TRL's GRPOTrainer with the policy gradient kept on forking tokens.

*Beyond the 80/20 Rule* (Wang et al., 2025, arXiv 2506.01939): restricting the RLVR policy gradient
to the ~20% highest-entropy completion tokens matches or beats full-token updates. TRL ships a
version of this (``top_entropy_quantile``) that thresholds at a quantile (ties keep more than ``rho``),
keeps TRL's normaliser over all tokens, and logs neither the threshold nor the kept fraction.

Rollout, rewards, advantages, loss types, vLLM, logging and checkpointing stay TRL's. This module is the
table of TRL overrides (the class docstring); each hands its work to a component that owns it:
:mod:`rlvr.training` (selection, forwards, setup, callbacks), :mod:`rlvr.rollouts` (the generation side)
and :mod:`rlvr.moe` (router-aware updates).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import PreTrainedModel
from trl import GRPOTrainer

from rlvr.forking.log import ForkingTokenLog
from rlvr.forking.selection import ForkingConfig, loss_normalization_unit, mask_gradient
from rlvr.forking.token_rules import TokenRulesConfig
from rlvr.models.loading import expose_backbone, runs_as_reference
from rlvr.moe.config import MoEConfig
from rlvr.moe.updates import RouterAwareUpdates
from rlvr.moe.zero3 import register_zero3_leaves
from rlvr.prompts import PromptsConfig
from rlvr.rollouts import GROUP_IDS_KEY, ROUTING_KEY, ReplayRecorder, RolloutConfig, Rollouts
from rlvr.training import callbacks, generation, log_records, setup
from rlvr.training.forwards import measure_forward, replayed_forward, sparse_forward
from rlvr.training.prompt_filter import PromptFilter
from rlvr.training.selection import (
    ForkingSelection,
    LossForward,
    MicroBatchSelection,
    entropy_bonus_mask,
    loss_mask,
    rlvr_entropy_bonus,
)
from rlvr.training.sparse_head import HeadTransform, text_only_loss_forward
from rlvr.training.token_rule_step import TokenRuleStep
from rlvr.training.trl_loading import zero3_leaves_as_trl_loads
from rlvr.training.vllm_routing import routed_experts_returned
from rlvr.utils.collectives import Collectives, OneProcess

__all__ = ["GROUP_IDS_KEY", "ROUTING_KEY", "ForkingGRPOTrainer"]

logger = logging.getLogger(__name__)


class ForkingGRPOTrainer(GRPOTrainer):
    """GRPO with the policy-gradient loss on the forking tokens (Wang et al., 2025).

    Args:
        forking: which tokens are forking and how the loss treats them (see :class:`rlvr.forking.ForkingConfig`).
        moe: router-aware updates and routing analytics (see :class:`rlvr.moe.config.MoEConfig`); ignored
            for dense models when left at its defaults.
        rollout: how training completions are sampled (:class:`rlvr.rollouts.config.RolloutConfig`).
        prompts: which prompts a step spends generation on (:class:`rlvr.prompts.config.PromptsConfig`).
        token_rules: an entropy intervention in the loss forward (:class:`rlvr.forking.token_rules.TokenRulesConfig`).
        peft_config: a PEFT config, passed to TRL, or :class:`rlvr.tuning.SVFConfig` (applied by rlvr).
        *args, **kwargs: passed to :class:`trl.GRPOTrainer` unchanged. Do not set
            ``args.top_entropy_quantile``: ``forking.rho`` replaces it.

    A drop-in: every TRL method overridden here keeps TRL's meaning outside rlvr's loss forward (the
    forward of ``_compute_loss`` on a training or eval micro-batch). The overrides, what changes, and who
    does it:

    ==========================================  ============================================================
    override                                    rlvr's part (component)
    ==========================================  ============================================================
    ``_compute_loss``                           the loss forward's state; router losses; the entropy bonus
                                                over all tokens with ``forking.mask_entropy_bonus=false``
                                                (``training.selection.LossForward``); KL-Cov's penalty
    ``_get_per_token_logps_and_entropies``      in the loss forward: the selection (``ForkingSelection``),
                                                MoE gates (``moe.RouterAwareUpdates``), the sparse LM head
                                                (``training.forwards``), ``token_rules``
                                                (``training.token_rule_step``); elsewhere TRL's values,
                                                routing recorded or replayed (``rollouts.ReplayRecorder``)
    ``get_high_entropy_mask``                   in the loss forward: the forking tokens' loss weights;
                                                elsewhere TRL's boolean mask
    ``training_step``                           TRL's, then the step's MoE gates released
    ``create_optimizer``                        routers in their own groups when ``moe.router_lr_multiplier
                                                != 1`` (``training.setup.router_groups``)
    ``_generate_and_score_completions``,        TRL's batch plus group ids, routing records, forking trees,
    ``_generate_single_turn``,                  TreeRL advantages and ``rollout/*`` metrics
    ``_calculate_rewards``                      (``rollouts.Rollouts``; ``prompts.filter``: ``PromptFilter``)
    ``log``                                     reward-function failure counts, the step's device metrics,
                                                the forking-token log (``forking.log.ForkingTokenLog``)
    ``_save_checkpoint``, ``save_model``,       rollout totals in each checkpoint (``training.callbacks``);
    ``_save``, ``_load_from_checkpoint``        full checkpoints through ``from_pretrained``; SVF vectors
    ==========================================  ============================================================

    rlvr's instance state has class-level defaults (below), so a trainer built without ``__init__`` reads
    TRL's behaviour instead of failing on a missing attribute; every override reads that state only when it
    has rlvr's type (``_own``), so a ``Mock(spec=ForkingGRPOTrainer)``, TRL's own test idiom, gets TRL's
    behaviour too.
    """

    forking: ForkingConfig = ForkingConfig()
    moe: MoEConfig = MoEConfig()
    rollout: RolloutConfig = RolloutConfig()
    prompts: PromptsConfig = PromptsConfig()
    prompt_filter: PromptFilter | None = None  # prompts.filter: dynamic or skip
    token_rules: TokenRulesConfig = TokenRulesConfig()
    token_rule_step: TokenRuleStep | None = None  # token_rules.rule other than none
    router_updates: RouterAwareUpdates | None = None  # None: a dense policy (or not built)
    rollouts: Rollouts = Rollouts(ReplayRecorder(None, "none"))  # records nothing: safe to share
    rollout_totals: callbacks.RolloutTotals | None = None
    loss_forward: LossForward | None = None  # set only while _compute_loss runs
    forking_log: ForkingTokenLog | None = None
    selection: ForkingSelection | None = None  # the forking tokens of each loss forward, and their records
    sparse_head: bool = False
    head_transform: HeadTransform | None = None  # the sparse head's logit transform
    collectives: Collectives = OneProcess()  # issues nothing

    def __init__(
        self,
        *args,
        forking: ForkingConfig | None = None,
        moe: MoEConfig | None = None,
        rollout: RolloutConfig | None = None,
        prompts: PromptsConfig | None = None,
        token_rules: TokenRulesConfig | None = None,
        **kwargs,
    ):
        self.forking = forking or ForkingConfig()
        self.moe = moe or MoEConfig()
        self.rollout, self.prompts = rollout or RolloutConfig(), prompts or PromptsConfig()
        self.rollout.validate()
        self.prompts.validate()
        self.token_rules = token_rules or TokenRulesConfig()
        self.token_rules.validate()
        model = kwargs.get("model", args[0] if args else None)
        kwargs["peft_config"] = setup.adapters(model, kwargs.get("peft_config"))  # SVF is applied here, LoRA by TRL
        if isinstance(model, torch.nn.Module):
            register_zero3_leaves(model)  # before DeepSpeed wraps it (in train())
        training_args = setup.rlvr_defaults(kwargs.get("args", args[2] if len(args) > 2 else None), self.moe)
        vllm_replay = bool(getattr(training_args, "use_vllm", False)) and self.moe.routing_replay == "rollout"
        asked_reentrant = (getattr(training_args, "gradient_checkpointing_kwargs", None) or {}).get("use_reentrant")
        # a model id: TRL loads the policy and the reference model itself; with vLLM it builds the engine
        with zero3_leaves_as_trl_loads(), routed_experts_returned(vllm_replay):
            super().__init__(*args, **kwargs)
        for policy in (self.model, getattr(self, "ref_model", None)):
            if isinstance(policy, PreTrainedModel):
                expose_backbone(policy)  # TRL's fused head reads model.base_model (Llama 4)
        self.top_entropy_quantile = setup.entropy_mask_switch(self)  # turns get_high_entropy_mask on or off
        normalization_unit = loss_normalization_unit(self.loss_type)  # an unknown loss type fails here
        self.collectives = Collectives.of(self.accelerator)  # every collective rlvr issues, on the accelerator
        setup.undo_forced_reentrant(self, asked_reentrant)  # PEFT under ZeRO-3, where DeepSpeed no longer needs it
        self.router_updates = setup.router_aware_updates(self)
        if self.router_updates is not None and self.moe.update_correction_bias:  # aux-loss-free balancing
            self.add_callback(callbacks.CorrectionBiasUpdate(self.router_updates))
        self._check_rollout()
        engine_sampling = self.args.use_vllm or self.rollout.engine == "copy"  # numerics other than the trainer's
        self.rollouts = setup.rollouts(self, measure=engine_sampling)
        if engine_sampling:
            setup.attach_engine(self, lambda batch: measure_forward(self, batch))
        self.rollout_totals = callbacks.RolloutTotals(self.rollouts)
        self.add_callback(self.rollout_totals)
        self.loss_forward = None
        vocab_size = max(self.model.config.get_text_config().vocab_size, len(self._tokenizer))  # a processor has no len
        self.forking_log = ForkingTokenLog(self.forking.log_examples, vocab_size)
        rank = self.accelerator.process_index
        self.selection = ForkingSelection(
            self.forking, normalization_unit, self.collectives, self.forking_log, int(self.args.seed), rank
        )
        self.prompt_filter = setup.prompt_filter(self)
        self.token_rule_step = setup.token_rule_step(self)
        self.head_transform = setup.sparse_head_transform(self)
        self.sparse_head = self.head_transform is not None
        setup.engine_weight_sync(self)  # an inference engine receives plain, whole weights (SVF merged, EP gathered)

    def _check_rollout(self) -> None:
        setup.check_rollout(self)  # what the rollout section cannot run with, as one-line errors

    @property
    def step_metrics(self) -> dict | None:
        """This step's device metrics by mode (``train``/``eval``), read when logged (``ForkingSelection``)."""
        return self.selection.step_metrics if isinstance(self.selection, ForkingSelection) else None

    @property
    def gradient_tokens(self) -> int:
        """Completion tokens with a non-zero policy-gradient weight in training so far, this rank (a host read)."""
        return int(self.selection.gradient_token_count) if isinstance(self.selection, ForkingSelection) else 0

    def gradient_tokens_all_ranks(self) -> int:
        """Completion tokens that carried policy gradient during training, summed over ranks."""
        count = self.selection.gradient_token_count if isinstance(self.selection, ForkingSelection) else 0
        return int(self.collectives.sum(torch.as_tensor(count)))

    # --------------------------------------------------------------------- Generation: rlvr.rollouts

    def _generate_and_score_completions(self, inputs):
        rollouts = _own(self, "rollouts", Rollouts)
        if rollouts is None:  # not built by __init__: TRL's batch
            return super()._generate_and_score_completions(inputs)
        sampling = _own(self, "prompt_filter", PromptFilter)
        return generation.produce_batch(self, rollouts, sampling, super()._generate_and_score_completions, inputs)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        rollouts = _own(self, "rollouts", Rollouts)
        generate = super()._generate_single_turn
        if rollouts is None:  # not built by __init__: TRL's sampling
            return generate(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
        return generation.sample(
            self, rollouts, generate, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # all ranks
        rollouts, collectives = _own(self, "rollouts", Rollouts), _own(self, "collectives", Collectives)
        if rollouts is not None and collectives is not None:
            completions = collectives.gather_objects(completions)
            rollouts.observe_rewards(rewards_per_func, self.reward_weights, completions, self._group_size())
        return rewards_per_func

    def _group_size(self) -> int:
        """Completions per prompt of the batch being produced (TRL's training or eval G)."""
        return self.num_generations if self.model.training else self.num_generations_eval

    # ----------------------------------------- Loss: select after the forward, hand TRL the weights

    def _compute_loss(self, model, inputs):
        if _own(self, "forking", ForkingConfig) is None:  # not built by __init__: TRL's loss
            return super()._compute_loss(model, inputs)
        self.loss_forward = LossForward(inputs)
        own_entropy_bonus = self._entropy_bonus_enabled and rlvr_entropy_bonus(self.forking, self.token_rules.rule)
        if own_entropy_bonus:  # TRL's would cover the loss weights' tokens only; add it ourselves instead
            self._entropy_bonus_enabled = False
        try:
            loss = super()._compute_loss(model, inputs)
            state = self.loss_forward
        finally:
            if own_entropy_bonus:
                self._entropy_bonus_enabled = True
            for undo in self.loss_forward.undo if self.loss_forward is not None else ():
                undo()  # what a token rule replaced for this forward: advantages, clip ranges, reference log-probs
            self.loss_forward = None
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0  # as TRL scales
        if own_entropy_bonus:  # mean entropy over its tokens (whatever a token rule stopped)
            mask = entropy_bonus_mask(self.forking, inputs, state.selection).to(state.entropies.dtype)
            bonus = (state.entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * bonus
        if state.router_loss is not None:
            loss = loss + state.router_loss / accumulation
        rule_step = _own(self, "token_rule_step", TokenRuleStep)
        if rule_step is not None and state.penalty is not None:  # KL-Cov (token_rules)
            loss = loss + rule_step.penalty_loss(state, accumulation)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        state = _own(self, "loss_forward", LossForward)
        updates = _own(self, "router_updates", RouterAwareUpdates)
        rollouts = _own(self, "rollouts", Rollouts)
        loss_forward = state is not None and torch.is_grad_enabled()
        if loss_forward and updates is not None:
            updates.begin(*input_ids.shape, forced=state.inputs.get(ROUTING_KEY))
        sparse = loss_forward and self.sparse_head is True and not args
        sparse = sparse and text_only_loss_forward(input_ids.size(0), kwargs)
        trl_forward = super()._get_per_token_logps_and_entropies
        try:
            recording = contextlib.nullcontext()
            if rollouts is not None:
                # the policy's own forward outside the loss (TRL's old-policy forward), not the reference
                # forward TRL runs on the same model with adapters disabled
                policy = model is self.model and not loss_forward
                policy = policy and not runs_as_reference(self.accelerator.unwrap_model(model))
                prompt_width = input_ids.size(1) - logits_to_keep
                recording = rollouts.replay.old_policy_forward(policy, prompt_width, logits_to_keep)
            with recording as forced:
                if sparse:
                    logps, entropies = sparse_forward(self, model, input_ids, attention_mask, logits_to_keep)
                    aux_loss = None
                elif forced is not None:  # the old-policy forward of an engine's batch, with its experts replayed
                    logps, entropies, aux_loss = replayed_forward(
                        trl_forward,
                        updates.hooks,
                        model,
                        input_ids,
                        attention_mask,
                        logits_to_keep,
                        forced,
                        *args,
                        **kwargs,
                    )
                else:
                    logps, entropies, aux_loss = trl_forward(
                        model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                    )
        except BaseException:
            if updates is not None:
                updates.abort()
            raise
        if state is not None and entropies is not None:  # the loss forward of _compute_loss
            state.entropies = entropies
            if state.selection is None:  # the sparse head selected inside its forward
                state.selection = self._select(entropies.detach(), state.inputs)
            rule_step = _own(self, "token_rule_step", TokenRuleStep)
            if rule_step is not None and loss_forward:  # Clip-Cov, KL-Cov, entropy advantage (token_rules)
                metrics = self.selection.step_metrics["train" if self.model.training else "eval"]
                metrics.update(rule_step.apply(state, logps, self._step))
            if loss_forward and updates is not None:  # gates, router losses and analytics of the forward
                mode = "train" if self.model.training else "eval"
                state.router_loss, metrics = updates.finish(
                    attention_mask, loss_mask(state.inputs), state.selection.keep, analytics=self.moe.analytics
                )
                self.selection.step_metrics[mode].update(metrics)
            if self.forking.mask_kl and self.beta != 0.0 and torch.is_grad_enabled():
                # The policy term already ignores dropped tokens; this also keeps the KL term's gradient
                # off them. The KL value that TRL logs still covers every token.
                logps = mask_gradient(logps, state.selection.keep)
        return logps, entropies, aux_loss

    def _select(self, entropies: torch.Tensor, inputs: dict) -> MicroBatchSelection:
        """Exact-k selection over this micro-batch (all ranks), as this rank's keep mask and loss weights."""
        main = self.accelerator.is_main_process
        return self.selection.select(entropies, inputs, self._step, self.model.training, main)

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Inside rlvr's loss forward: the loss weights of the forking tokens (replacing TRL's ``entropy >=
        quantile`` mask). Anywhere else: TRL's own boolean mask for ``threshold``."""
        state = _own(self, "loss_forward", LossForward)
        if state is None:
            return super().get_high_entropy_mask(entropies, mask, threshold)
        if state.selection is None:
            raise RuntimeError("TRL asked for the entropy mask before rlvr's loss forward selected the forking tokens")
        return state.selection.weights

    # ----------------------------------------------- Router-aware updates, checkpoints, logging

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)  # forward, loss, backward
        finally:
            updates = _own(self, "router_updates", RouterAwareUpdates)
            if updates is not None:
                updates.release()

    def create_optimizer(self, *args, **kwargs):
        """TRL's optimizer, with the router parameters in their own groups at ``lr x moe.router_lr_multiplier``."""
        optimizer = super().create_optimizer(*args, **kwargs)
        updates, moe = _own(self, "router_updates", RouterAwareUpdates), _own(self, "moe", MoEConfig)
        if updates is None or moe is None or moe.router_lr_multiplier == 1.0:
            return optimizer
        return setup.router_groups(optimizer, updates, moe.router_lr_multiplier)

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint, plus rlvr's state (before ``on_save`` marks the checkpoint complete)."""
        super()._save_checkpoint(model, trial)
        if _own(self, "forking", ForkingConfig) is not None:
            callbacks.save_checkpointed_state(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's save; SVF under ZeRO-3 gathers its vectors on every rank first (``setup.gathered_svf_state``)."""
        if (state := setup.gathered_svf_state(self)) is None:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """TRL's save; an SVF policy saves its vectors (and trained routers) alone (:mod:`rlvr.tuning.svf`)."""
        if not setup.save_svf_policy(self, output_dir or self.args.output_dir, state_dict):
            super()._save(output_dir, state_dict)

    def _init_training_state(self, max_steps, steps_per_epoch, epochs, resume_from_checkpoint, trial):
        """TRL's, then rlvr's state kept in the checkpoint resumed from, wherever it is (``CheckpointedState``)."""
        trained = super()._init_training_state(max_steps, steps_per_epoch, epochs, resume_from_checkpoint, trial)
        if _own(self, "forking", ForkingConfig) is not None:
            callbacks.load_checkpointed_state(self, resume_from_checkpoint)
        return trained

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume with the weights converted as ``from_pretrained`` converts them (fused MoE experts:
        :func:`rlvr.training.setup.load_full_checkpoint`) or SVF vectors; TRL's path under DeepSpeed, for PEFT
        adapters, or without a full model."""
        model = model if model is not None else self.model
        if self.is_deepspeed_enabled or not setup.load_full_checkpoint(model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        selection, forking_log = _own(self, "selection", ForkingSelection), _own(self, "forking_log", ForkingTokenLog)
        if selection is None:  # not built by __init__: TRL's log
            return super().log(logs, start_time)
        log_records.before_log(self, selection, logs)  # reward-function failures, the step's device metrics
        super().log(logs, start_time)
        log_records.after_log(self, forking_log, _own(self, "router_updates", RouterAwareUpdates))


def _own(trainer, name: str, kind: type):
    """rlvr's instance state ``name`` when it is a ``kind`` (as ``__init__`` or the class default makes it),
    else None. A ``Mock(spec=ForkingGRPOTrainer)`` (TRL's own test idiom) answers every attribute with a
    Mock: reading state through here gives it TRL's behaviour, not rlvr's."""
    value = getattr(trainer, name, None)
    return value if isinstance(value, kind) else None
