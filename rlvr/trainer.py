"""ForkingGRPOTrainer: TRL's GRPOTrainer with the policy gradient kept on forking tokens.

*Beyond the 80/20 Rule* (Wang et al., 2025, arXiv 2506.01939): restricting the RLVR policy gradient
to the ~20% highest-entropy completion tokens matches or beats full-token updates. TRL ships a
version of this (``top_entropy_quantile``) that thresholds at a quantile (ties keep more than ``rho``),
keeps TRL's normaliser over all tokens, and logs neither the threshold nor the kept fraction.

Rollout, rewards, advantages, loss types, vLLM, logging and checkpointing stay TRL's. The overrides,
by what they are for:

* the selection -- ``_get_per_token_logps_and_entropies``: after TRL's fused forward returns per-token
  entropies, select exactly ``k = ceil(rho * n)`` tokens per scope unit with
  :func:`rlvr.forking.select_forking_tokens` (gathered across ranks); ``get_high_entropy_mask``: hand
  TRL that selection as loss weights, normalised over the selected tokens (the paper) or all tokens
  (TRL), in the unit the loss type averages over (:data:`rlvr.forking.LOSS_NORMALIZATION_UNITS`);
  ``_compute_loss``: the state of one loss forward (:class:`LossForward`), the entropy bonus on all
  tokens if asked, the router losses;
* router-aware updates on MoE policies (:mod:`rlvr.moe`) -- gates and router losses set in the loss
  forward, released after backward (``training_step``); router learning rate (``create_optimizer``);
* the generation side -- ``_generate_and_score_completions``, ``_generate_single_turn`` and
  ``_calculate_rewards`` delegate to :class:`rlvr.rollouts.Rollouts` (prompt group of each row; experts
  recorded for routing replay, forced in the loss forward; forking-tree sampling and TreeRL advantages
  with ``rollout.mode=forking_tree``; the ``rollout/*`` cost metrics);
* ``log``: selection metrics, and the records of :class:`rlvr.forking_log.ForkingTokenLog`;
* ``_save_checkpoint`` / ``_load_from_checkpoint``: the rollout totals in each checkpoint; resume MoE
  weights as ``from_pretrained`` converts them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, TrainerCallback
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import maybe_gather_lm_head_ctx

from rlvr.collectives import Collectives, OneProcess
from rlvr.configuration import ConfigError
from rlvr.device_metrics import DeviceMetrics
from rlvr.forking import (
    ForkingConfig,
    loss_normalization_unit,
    loss_weights,
    mask_gradient,
    select_forking_tokens,
    selection_stats,
)
from rlvr.forking_log import ForkingTokenLog
from rlvr.models.loading import expose_backbone, runs_as_reference
from rlvr.moe import UnknownMoEArchitecture
from rlvr.moe.config import MoEConfig
from rlvr.moe.updates import RouterAwareUpdates
from rlvr.moe.zero3 import register_zero3_leaves
from rlvr.rollouts import GROUP_IDS_KEY, ROUTING_KEY, ReplayRecorder, RolloutConfig, Rollouts
from rlvr.rollouts.copy_engine import CopyEngine, CopyEngineGeneration
from rlvr.sparse_head import (
    MULTIMODAL_KEYS,
    HeadTransform,
    add_sparse_head_route,
    sparse_completion_logprobs,
    sparse_head_blockers,
    text_only_loss_forward,
)
from rlvr.trl_loading import zero3_leaves_as_trl_loads
from rlvr.vllm_routing import VLLMRoutedExperts, routed_experts_returned

__all__ = ["GROUP_IDS_KEY", "ROUTING_KEY", "ForkingGRPOTrainer"]

logger = logging.getLogger(__name__)


@dataclass
class MicroBatchSelection:
    """The forking tokens of the micro-batch being trained on (this rank's rows)."""

    keep: torch.Tensor  # (B, T) bool
    weights: torch.Tensor  # (B, T) float loss weights (0 for dropped tokens and padding)


@dataclass
class LossForward:
    """The state one ``_compute_loss`` shares between the TRL methods it calls: set when it starts,
    filled by the loss forward (``_get_per_token_logps_and_entropies``), read by
    ``get_high_entropy_mask`` and at the end of ``_compute_loss``, dropped when it returns."""

    inputs: dict  # the micro-batch
    selection: MicroBatchSelection | None = None
    entropies: torch.Tensor | None = None  # (B, T) with gradient: for an entropy bonus on all tokens
    router_loss: torch.Tensor | None = None  # scoped load-balancing / z-loss of the forward


class CorrectionBiasUpdate(TrainerCallback):
    """Run :meth:`RouterAwareUpdates.update_correction_bias` after each optimizer step."""

    def __init__(self, updates: RouterAwareUpdates):
        self.updates = updates

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updates.update_correction_bias()


class RolloutTotals(TrainerCallback):
    """Reads the rollout totals (decoded tokens, generation seconds) back when a run resumes from a
    checkpoint; ``ForkingGRPOTrainer._save_checkpoint`` writes them into it."""

    FILE = "rlvr_rollouts.json"

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def save(self, directory: str) -> None:
        totals = {
            "decoded_tokens_total": self.rollouts.decoded_tokens_total,
            "generation_seconds_total": self.rollouts.generation_seconds_total,
        }
        with open(os.path.join(directory, self.FILE), "w") as handle:
            json.dump(totals, handle)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.FILE)
        if state.global_step > 0 and os.path.isfile(saved):  # resumed from that checkpoint
            with open(saved) as handle:
                totals = json.load(handle)
            self.rollouts.decoded_tokens_total = int(totals["decoded_tokens_total"])
            self.rollouts.generation_seconds_total = float(totals["generation_seconds_total"])


class ForkingGRPOTrainer(GRPOTrainer):
    """GRPO with the policy-gradient loss on the forking tokens (Wang et al., 2025).

    Args:
        forking: which tokens are forking and how the loss treats them (see :class:`rlvr.forking.ForkingConfig`).
        moe: router-aware updates and routing analytics (see :class:`rlvr.moe.config.MoEConfig`); ignored
            for dense models when left at its defaults.
        rollout: how training completions are sampled (see :class:`rlvr.rollouts.config.RolloutConfig`):
            TRL's i.i.d. samples (the default) or forking trees.
        *args, **kwargs: passed to :class:`trl.GRPOTrainer` unchanged. Do not set
            ``args.top_entropy_quantile``: ``forking.rho`` replaces it.

    A drop-in: every TRL method overridden here keeps TRL's meaning outside rlvr's loss forward (the
    forward of ``_compute_loss`` on a training or eval micro-batch). What changes, and where:

    * ``get_high_entropy_mask``: inside the loss forward, the forking tokens' float loss weights;
      elsewhere TRL's boolean ``entropy >= quantile(threshold)`` mask, computed by TRL.
    * ``_compute_loss`` (the loss forward itself): TRL's loss on the forking tokens, plus the router
      losses and, with ``forking.mask_entropy_bonus=false``, the entropy bonus over all tokens.
    * ``_get_per_token_logps_and_entropies``: inside the loss forward, the selection, the MoE gates and
      (``forking.sparse_lm_head``) the sparse LM head; elsewhere TRL's values, with routing recorded in
      the old-policy forward when ``moe.routing_replay=old_policy``.
    * ``training_step``: TRL's, then the MoE gates of the step are released.
    * ``create_optimizer``: TRL's optimizer; routers get their own groups only when
      ``moe.router_lr_multiplier != 1``.
    * ``_generate_and_score_completions`` / ``_generate_single_turn`` / ``_calculate_rewards``: TRL's batch
      plus rlvr's keys (prompt group ids; the routing record with ``moe.routing_replay=rollout``) and
      ``rollout/*`` cost metrics, via :mod:`rlvr.rollouts`; with ``rollout.mode=forking_tree`` the training
      completions are forking trees (and ``rollout.advantage=treerl`` replaces TRL's advantages).
    * ``log``: TRL's record plus the failure counts of rlvr's reward functions; writes the forking-token log.
    * ``_save_checkpoint`` / ``_load_from_checkpoint``: the rollout totals saved with each checkpoint; full
      checkpoints load through ``from_pretrained`` (fused MoE experts).

    rlvr's instance state has class-level defaults (below), so a trainer built without ``__init__`` reads
    TRL's behaviour instead of failing on a missing attribute; every override reads that state only when it
    has rlvr's type (``_own``), so a ``Mock(spec=ForkingGRPOTrainer)``, TRL's own test idiom, gets TRL's
    behaviour too.
    """

    forking: ForkingConfig = ForkingConfig()
    moe: MoEConfig = MoEConfig()
    rollout: RolloutConfig = RolloutConfig()
    router_updates: RouterAwareUpdates | None = None  # None: a dense policy (or not built)
    rollouts: Rollouts = Rollouts(ReplayRecorder(None, "none"))  # records nothing: safe to share
    rollout_totals: RolloutTotals | None = None
    loss_forward: LossForward | None = None  # set only while _compute_loss runs
    forking_log: ForkingTokenLog | None = None
    sparse_head: bool = False
    step_metrics: dict[str, DeviceMetrics] | None = None  # "train"/"eval": this step's metrics, read when logged
    collectives: Collectives = OneProcess()  # issues nothing
    _gradient_token_count: torch.Tensor | int = 0

    def __init__(
        self,
        *args,
        forking: ForkingConfig | None = None,
        moe: MoEConfig | None = None,
        rollout: RolloutConfig | None = None,
        **kwargs,
    ):
        self.forking = forking or ForkingConfig()
        self.moe = moe or MoEConfig()
        self.rollout = rollout or RolloutConfig()
        self.rollout.validate()
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):
            register_zero3_leaves(model)  # before DeepSpeed wraps it (in train())
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        vllm_replay = bool(getattr(training_args, "use_vllm", False)) and self.moe.routing_replay == "rollout"
        # a model id: TRL loads the policy and the reference model itself; with vLLM it builds the engine
        with zero3_leaves_as_trl_loads(), routed_experts_returned(vllm_replay):
            super().__init__(*args, **kwargs)
        for policy in (self.model, getattr(self, "ref_model", None)):
            if isinstance(policy, PreTrainedModel):
                expose_backbone(policy)  # TRL's fused head reads model.base_model (Llama 4)
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                "ForkingGRPOTrainer replaces GRPOConfig.top_entropy_quantile with an exact top-k: pass "
                "forking=ForkingConfig(rho=...) and leave top_entropy_quantile at 1.0"
            )
        # TRL calls get_high_entropy_mask() only when top_entropy_quantile < 1; any value below 1 turns
        # that call on, and our override ignores the quantile.
        self.top_entropy_quantile = 0.0 if self.forking.policy_tokens == "forking" else 1.0
        self.normalization_unit = loss_normalization_unit(self.loss_type)  # an unknown loss type fails here
        self.collectives = Collectives.of(self.accelerator)  # every collective rlvr issues, on the accelerator
        self.router_updates = self._router_aware_updates()
        self._check_rollout()
        engine_sampling = self.args.use_vllm or self.rollout.engine == "copy"  # numerics other than the trainer's
        self.rollouts = Rollouts(
            ReplayRecorder(
                self.router_updates.hooks if self.router_updates is not None else None,
                self.moe.routing_replay if self.router_updates is not None else "none",
                measure=engine_sampling,
            ),
            self.rollout,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self._tokenizer.pad_token_id,
            sum_across_ranks=self.collectives.sum,
            gather=self.collectives.gather_rows,
        )
        if engine_sampling:
            self._attach_engine()
        self.rollout_totals = RolloutTotals(self.rollouts)
        self.add_callback(self.rollout_totals)
        self.loss_forward = None
        vocab_size = max(self.model.config.get_text_config().vocab_size, len(self._tokenizer))  # a processor has no len
        self.forking_log = ForkingTokenLog(self.forking.log_examples, vocab_size)
        self.sparse_head = self._use_sparse_head()
        self.step_metrics = {"train": DeviceMetrics(), "eval": DeviceMetrics()}
        self._gradient_token_count = 0  # becomes a device tensor: read when logged or asked for

    def _router_aware_updates(self) -> RouterAwareUpdates | None:
        """Gates, router losses and analytics of an MoE policy; None for a dense one (with default settings)."""
        try:
            updates = RouterAwareUpdates(
                self.model, self.moe, sum_across_ranks=self.collectives.sum, world_size=self.accelerator.num_processes
            )
        except UnknownMoEArchitecture:
            if not self.moe.is_default():
                raise
            return None  # a dense policy: nothing to route
        if self.moe.freeze_router:
            updates.freeze_routers()
        if self.moe.update_correction_bias:  # aux-loss-free balancing after every optimizer step (off by default)
            self.add_callback(CorrectionBiasUpdate(updates))
        reentrant = self.args.gradient_checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get(
            "use_reentrant"
        )
        if reentrant and self.moe.needs_recorded_routing():
            raise ValueError(
                "rlvr.moe gates, router losses and routing replay need "
                "gradient_checkpointing_kwargs.use_reentrant=False "
                "(TRL's default): reentrant checkpointing re-runs the forward in backward without the recorded routing"
            )
        if self.moe.routing_replay == "rollout" and getattr(self, "use_transformers_continuous_batching", False):
            raise ValueError(
                "moe.routing_replay='rollout' replays the experts the sampler chose, which paged generation does not "
                "return; use routing_replay='old_policy' or 'none'"
            )
        return updates

    def _check_rollout(self) -> None:
        """What ``rollout.mode=forking_tree`` and ``rollout.engine=copy`` cannot run with, as one-line errors."""
        active = {
            "use_vllm": self.args.use_vllm,  # the setting: the copy engine runs TRL's vLLM path
            "use_transformers_paged": getattr(self, "use_transformers_continuous_batching", False),
            "tools": bool(self.tools),
            "rollout_func": self.rollout_func is not None,
        }
        rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        try:
            self.rollout.check_run(self.num_generations, rows, [name for name, on in active.items() if on])
            self.rollout.check_engine([name for name, on in {**active, "DeepSpeed ZeRO-3": zero3}.items() if on])
            correction = self.vllm_importance_sampling_correction
            self.rollout.check_loss(
                self.loss_type,
                self.off_policy_mask_threshold is not None,
                self.vllm_importance_sampling_mode if correction else None,
            )
        except ValueError as error:
            raise ValueError(f"rollout.{error}") from None

    def _attach_engine(self) -> None:
        """Sampling with numerics of the engine's own: the copy engine (``rollout.engine=copy``) behind TRL's
        vLLM generator interface, so TRL's vLLM path (weight sync after optimizer steps, sampling log-probs,
        importance-sampling correction) runs on it unchanged; or TRL's vLLM with its routed experts kept.
        Either way each batch's mismatch is measured (``mismatch/*``)."""
        if self.rollout.engine == "copy":
            policy = self.accelerator.unwrap_model(self.model)
            dtype = (
                next(policy.parameters()).dtype if self.rollout.dtype == "auto" else getattr(torch, self.rollout.dtype)
            )
            engine = CopyEngine(
                policy,
                dtype,
                self.rollout.router_noise,
                seed=int(self.args.seed) * 1009 + self.accelerator.process_index,
            )
            self.vllm_generation = CopyEngineGeneration(
                engine,
                lambda: self.accelerator.unwrap_model(self.model),
                self.generation_config,
                self._tokenizer.pad_token_id,
                self.eos_token_ids,
            )
            self.use_vllm, self.vllm_mode, self._last_loaded_step = True, "colocate", -1  # TRL's vLLM path
            routed = self.vllm_generation
        else:
            routed = VLLMRoutedExperts(
                self.vllm_generation,
                self.accelerator.process_index,
                self.accelerator.num_processes,
                broadcast=self.collectives.broadcast_objects,
            )
        correction = None
        if self.vllm_importance_sampling_correction:
            correction = (
                self.vllm_importance_sampling_mode,
                self.vllm_importance_sampling_clip_min,
                self.vllm_importance_sampling_clip_max,
            )
        self.rollouts.attach_engine(routed, self._measure_forward, correction)

    def _use_sparse_head(self) -> bool:
        """Whether the loss forward projects only the forking tokens through the LM head with gradient
        (:mod:`rlvr.sparse_head`): only where that gives TRL's gradient exactly. Logs the reason once."""
        setting = self.forking.sparse_lm_head
        blockers = sparse_head_blockers(self)
        if setting == "false":
            blockers = ["forking.sparse_lm_head=false"]
        elif setting == "true" and blockers:
            raise ConfigError(f"forking.sparse_lm_head: true, but it would not be exact: {'; '.join(blockers)}")
        if blockers:
            if self.accelerator.is_main_process:
                logger.info("LM head: TRL's fused head on every token (%s)", "; ".join(blockers))
            return False
        add_sparse_head_route(self.model)
        self._head_transform = HeadTransform.of(self.model.config, self.temperature)
        if self.accelerator.is_main_process:
            logger.info("LM head: backward on the forking tokens only (rlvr.sparse_head)")
        return True

    @property
    def gradient_tokens(self) -> int:
        """Completion tokens with a non-zero policy-gradient weight in training so far, this rank (a host read)."""
        return int(self._gradient_token_count)

    def gradient_tokens_all_ranks(self) -> int:
        """Completion tokens that carried policy gradient during training, summed over ranks."""
        return int(self.collectives.sum(torch.as_tensor(self._gradient_token_count)))

    # ---------------------------------------------------------------------------------------------
    # Generation: delegated to rlvr.rollouts (prompt groups of the rows, routing recorded for replay).

    def _generate_and_score_completions(self, inputs):
        rollouts = _own(self, "rollouts", Rollouts)
        if rollouts is None:  # not built by __init__: TRL's batch
            return super()._generate_and_score_completions(inputs)
        training = self.model.training
        produce = functools.partial(super()._generate_and_score_completions, inputs)
        batch, metrics = rollouts.produce_batch(produce, self._group_size(), self.accelerator.process_index, training)
        mode = "train" if training else "eval"
        if rollouts.logged_advantages is not None:  # TRL logged its group advantages; show the ones used
            logged = self._logs["advantages"]  # a deque: TRL appended this batch's rows last
            used = rollouts.logged_advantages[-len(logged) :] if len(logged) else []
            for index, value in enumerate(used, start=len(logged) - len(used)):
                logged[index] = value
        for key, value in metrics.items():
            if key == "rollout/decoded_tokens_total":  # a running total: logged as its latest value
                self._metrics[mode][key] = [value]
            else:
                self._metrics[mode][key].append(value)
        return batch

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        rollouts = _own(self, "rollouts", Rollouts)
        generate = super()._generate_single_turn
        if rollouts is None:  # not built by __init__: TRL's sampling
            return generate(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
        if not rollouts.branches(self.model.training):
            return rollouts.generate(generate, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
        if images is not None or multimodal_fields:
            raise ValueError("rollout.mode=forking_tree supports text-only prompts")
        with self._generation_model() as model:
            return rollouts.generate_tree(model, prompt_ids, num_generations, self.generation_config)

    @contextlib.contextmanager
    def _generation_model(self):
        """The policy as TRL's ``_generate_single_turn`` samples with it (unwrapped, ZeRO-3 weights gathered)."""
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            yield unwrapped_model

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

    # ---------------------------------------------------------------------------------------------
    # Loss: select after the forward, hand TRL the weights.

    def _compute_loss(self, model, inputs):
        if _own(self, "forking", ForkingConfig) is None:  # not built by __init__: TRL's loss
            return super()._compute_loss(model, inputs)
        self.loss_forward = LossForward(inputs)
        own_entropy_bonus = (
            self._entropy_bonus_enabled
            and not self.forking.mask_entropy_bonus
            and self.forking.policy_tokens == "forking"
        )
        if own_entropy_bonus:  # TRL would restrict the bonus to the selected tokens; add it ourselves instead
            self._entropy_bonus_enabled = False
        try:
            loss = super()._compute_loss(model, inputs)
            state = self.loss_forward
        finally:
            if own_entropy_bonus:
                self._entropy_bonus_enabled = True
            self.loss_forward = None
        if own_entropy_bonus:
            loss = loss - self.entropy_coef * self._entropy_bonus(inputs, state.entropies)
        if state.router_loss is not None:  # scaled for gradient accumulation like TRL's policy loss
            accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
            loss = loss + state.router_loss / accumulation
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        state = _own(self, "loss_forward", LossForward)
        updates = _own(self, "router_updates", RouterAwareUpdates)
        rollouts = _own(self, "rollouts", Rollouts)
        loss_forward = state is not None and torch.is_grad_enabled()
        if loss_forward and updates is not None:
            updates.begin(*input_ids.shape, forced=state.inputs.get(ROUTING_KEY))
        sparse = (
            loss_forward and self.sparse_head is True and not args and text_only_loss_forward(input_ids.size(0), kwargs)
        )
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
                    logps, entropies = self._sparse_loss_forward(model, input_ids, attention_mask, logits_to_keep)
                    aux_loss = None
                elif forced is not None:  # the old-policy forward of an engine's batch, with its experts replayed
                    logps, entropies, aux_loss = self._replayed_forward(
                        model, input_ids, attention_mask, logits_to_keep, forced, *args, **kwargs
                    )
                else:
                    logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
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
            if loss_forward and updates is not None:
                self._finish_router_updates(attention_mask, state)
            if self.forking.mask_kl and self.beta != 0.0 and torch.is_grad_enabled():
                # The policy term already ignores dropped tokens; this also keeps the KL term's gradient
                # off them. The KL value that TRL logs still covers every token.
                logps = mask_gradient(logps, state.selection.keep)
        return logps, entropies, aux_loss

    def _replayed_forward(self, model, input_ids, attention_mask, logits_to_keep, forced, *args, **kwargs):
        """TRL's no-grad forward, in the row chunks TRL would use, with ``forced`` (B, L, layers, k) experts
        replayed in each (the routers' own choice is recorded by the surrounding ``old_policy_forward``)."""
        if args or any(kwargs.get(key) is not None for key in MULTIMODAL_KEYS):
            raise ValueError("moe.routing_replay=rollout with an engine supports text-only batches")
        options = {key: value for key, value in kwargs.items() if key not in MULTIMODAL_KEYS and key != "batch_size"}
        hooks = self.router_updates.hooks
        rows = kwargs.get("batch_size") or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), rows):
            chunk = slice(start, start + rows)
            hooks.begin(*input_ids[chunk].shape, forced=forced[chunk].to(input_ids.device))
            try:
                chunk_logps, chunk_entropies, chunk_aux = super()._get_per_token_logps_and_entropies(
                    model, input_ids[chunk], attention_mask[chunk], logits_to_keep, **options
                )
            finally:
                hooks.release()
            logps.append(chunk_logps)
            entropies.append(chunk_entropies)
            aux_losses.append(chunk_aux)
        entropies = None if entropies[0] is None else torch.cat(entropies)
        aux_loss = None if aux_losses[0] is None else torch.stack(aux_losses).mean()  # as TRL averages chunks
        return torch.cat(logps), entropies, aux_loss

    @torch.no_grad()
    def _measure_forward(self, batch: dict) -> torch.Tensor:
        """The policy's (B, C) log-probs of an engine-sampled batch, for its mismatch metrics, when TRL ran
        no old-policy forward on it (no importance-sampling correction, one optimizer step per batch)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + C)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P + C)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            batch["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logps

    def _sparse_loss_forward(self, model, input_ids, attention_mask, logits_to_keep):
        """The loss forward through :func:`rlvr.sparse_head.sparse_completion_logprobs`: every completion
        token's log-prob and entropy without a graph, the selection, then the LM head with gradient on
        the selected tokens only. Returns (B, T) log-probs and entropies, as TRL's forward does."""
        state = self.loss_forward
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, L), as TRL scores
        labels[:, :-logits_to_keep] = -100

        def select(entropies: torch.Tensor) -> torch.Tensor:
            state.selection = self._select(entropies, state.inputs)
            return state.selection.keep

        def head(hidden, shifted_labels, lm_head):  # (B, L-1, H), (B, L-1)
            hidden, shifted_labels = hidden[:, -logits_to_keep:], shifted_labels[:, -logits_to_keep:]
            fp32 = self.args.cast_lm_head_to_fp32
            with torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext():
                return sparse_completion_logprobs(
                    hidden.float() if fp32 else hidden,
                    shifted_labels,
                    lm_head,
                    self._head_transform,
                    select,
                    gather=lambda: maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias),
                    kernel=self.forking.sparse_head_kernel,
                )

        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, sparse_head=head)

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Inside rlvr's loss forward: the loss weights of the forking tokens (replacing TRL's ``entropy >=
        quantile`` mask). Anywhere else: TRL's own boolean mask for ``threshold``."""
        state = _own(self, "loss_forward", LossForward)
        if state is None:
            return super().get_high_entropy_mask(entropies, mask, threshold)
        if state.selection is None:
            raise RuntimeError("TRL asked for the entropy mask before rlvr's loss forward selected the forking tokens")
        return state.selection.weights

    def _select(self, entropies: torch.Tensor, inputs: dict) -> MicroBatchSelection:
        """Exact-k selection over this micro-batch (all ranks), as this rank's keep mask and loss weights."""
        mask = _loss_mask(inputs).bool()  # (B, T)
        group_ids = inputs.get(GROUP_IDS_KEY)
        if group_ids is None:
            group_ids = torch.arange(mask.size(0), device=mask.device)
        # k is counted over the micro-batch of every rank: gather (identities on one process), select, keep ours
        all_entropies = self.collectives.gather_rows(entropies, 0.0)  # (world * B, T_max)
        all_mask = self.collectives.gather_rows(mask, False)  # (world * B, T_max) bool on every rank
        all_group_ids = self.collectives.gather_rows(group_ids)  # (world * B,)
        # One random stream per micro-step, identical on every rank.
        generator = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + self._step)
        all_keep = select_forking_tokens(
            all_entropies,
            all_mask,
            self.forking.rho,
            self.forking.selection,
            self.forking.scope,
            group_ids=all_group_ids,
            generator=generator,
        )
        rows, length = mask.shape
        first = self.accelerator.process_index * rows
        keep = all_keep[first : first + rows, :length]

        unit = self.normalization_unit
        totals = (all_mask.sum(), (all_keep & all_mask.bool()).sum()) if unit == "generation_batch" else None
        weights = loss_weights(
            keep, mask, self.forking.loss_normalization, per_sequence=unit == "sequence", totals=totals
        ).to(entropies.dtype)
        self._record(all_entropies, all_mask, all_keep, inputs, mask, keep)
        return MicroBatchSelection(keep=keep, weights=weights)

    def _entropy_bonus(self, inputs: dict, entropies: torch.Tensor) -> torch.Tensor:
        """Mean entropy over all completion tokens, scaled for gradient accumulation (as TRL does)."""
        mask = _loss_mask(inputs).to(entropies.dtype)
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation

    # ---------------------------------------------------------------------------------------------
    # Router-aware updates (MoE policies)

    def _finish_router_updates(self, attention_mask: torch.Tensor, state: LossForward) -> None:
        """Gates, router losses and analytics of the loss forward, now that the forking tokens are known."""
        mode = "train" if self.model.training else "eval"
        state.router_loss, metrics = self.router_updates.finish(
            attention_mask, _loss_mask(state.inputs), state.selection.keep, analytics=self.moe.analytics
        )
        self.step_metrics[mode].update(metrics)

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
        router_ids = {id(p) for p in updates.router_parameters()}
        for group in list(optimizer.param_groups):
            routers = [p for p in group["params"] if id(p) in router_ids]
            if not routers:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in router_ids]
            optimizer.add_param_group({**group, "params": routers, "lr": group["lr"] * moe.router_lr_multiplier})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    # ---------------------------------------------------------------------------------------------
    # Checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint, plus the rollout totals (before ``on_save`` marks the checkpoint complete)."""
        super()._save_checkpoint(model, trial)
        directory = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        totals = _own(self, "rollout_totals", RolloutTotals)
        if totals is not None and self.args.should_save and os.path.isdir(directory):
            totals.save(directory)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume with the weights converted as ``from_pretrained`` converts them.

        transformers 5 saves fused MoE experts in the per-expert hub layout and converts them back when
        loading through ``from_pretrained``; the Trainer's own resume path loads the raw state dict with
        ``strict=False`` and silently leaves every expert at its initial weights.
        """
        model = model if model is not None else self.model
        has_full_model = os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")) and any(
            name.endswith(".safetensors") for name in os.listdir(resume_from_checkpoint)
        )
        if not has_full_model or not hasattr(type(model), "from_pretrained") or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    # ---------------------------------------------------------------------------------------------
    # Logging

    def _record(self, all_entropies, all_mask, all_keep, inputs, loss_mask, keep) -> None:
        """Selection metrics (over all ranks), gradient-token count (this rank), the forking-token log (rank 0),
        all kept on the device until the next logging step (no host read here)."""
        mode = "train" if self.model.training else "eval"
        stats = selection_stats(all_entropies, all_mask, all_keep, self.forking.selection)
        self.step_metrics[mode].update(stats.as_metrics())
        if mode != "train":
            return
        if torch.is_grad_enabled():
            counted = keep & loss_mask.bool() if self.forking.policy_tokens == "forking" else loss_mask.bool()
            self._gradient_token_count = self._gradient_token_count + counted.sum()
        if self.accelerator.is_main_process:
            self.forking_log.add(all_entropies, all_mask, inputs["completion_ids"], loss_mask, keep)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step_metrics, forking_log = _own(self, "step_metrics", dict), _own(self, "forking_log", ForkingTokenLog)
        if step_metrics is None:  # not built by __init__: TRL's log
            return super().log(logs, start_time)
        for function in self.reward_funcs:  # failure, timeout and parse-failure counts of rlvr's reward functions
            pop_stats = getattr(function, "pop_stats", None)
            if callable(pop_stats) and "loss" in logs:
                logs.update(pop_stats().as_metrics(getattr(function, "__name__", type(function).__name__)))
        mode = "train" if self.model.training else "eval"
        for key, values in step_metrics[mode].drain().items():  # one host read; TRL averages them
            self._metrics[mode][key].extend(values)
        super().log(logs, start_time)
        if self.accelerator.is_main_process and forking_log is not None:
            updates = _own(self, "router_updates", RouterAwareUpdates)
            loads = updates.pop_expert_loads() if updates is not None else None
            forking_log.write(self.args.output_dir, self.state.global_step, self.processing_class, loads)


def _own(trainer, name: str, kind: type):
    """rlvr's instance state ``name`` when it is a ``kind`` (as ``__init__`` or the class default makes it),
    else None. A ``Mock(spec=ForkingGRPOTrainer)`` (TRL's own test idiom) answers every attribute with a
    Mock: reading state through here gives it TRL's behaviour, not rlvr's."""
    value = getattr(trainer, name, None)
    return value if isinstance(value, kind) else None


def _loss_mask(inputs: dict) -> torch.Tensor:
    """TRL's per-token loss mask: completion tokens, minus tool-output tokens."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
