"""ForkingGRPOTrainer: TRL's GRPOTrainer with the policy gradient kept on forking tokens.

*Beyond the 80/20 Rule* (Wang et al., 2025, arXiv 2506.01939): restricting the RLVR policy gradient
to the ~20% highest-entropy completion tokens matches or beats full-token updates. TRL ships a
version of this (``top_entropy_quantile``) that thresholds at a quantile (ties keep more than ``rho``),
keeps TRL's normaliser over all tokens, and logs neither the threshold nor the kept fraction.

This subclass changes three things and nothing else; rollout, rewards, advantages, loss types,
vLLM, logging and checkpointing are TRL's:

1. ``_get_per_token_logps_and_entropies``: after TRL's fused forward returns per-token entropies,
   select exactly ``k = ceil(rho * n)`` tokens per scope unit with :func:`rlvr.forking.select_forking_tokens`
   (entropies and masks gathered across ranks for the micro-batch and group scopes).
2. ``get_high_entropy_mask``: hand TRL that selection as loss weights, normalised over the selected
   tokens (the paper) or over all completion tokens (TRL), in the unit TRL's loss type averages over.
3. ``log``: add the selection's threshold, kept fraction, entropy of kept vs dropped tokens, and write
   a few completions with their forking tokens marked to ``<output_dir>/forking_tokens.jsonl``.

On MoE policies it also applies router-aware updates (:mod:`rlvr.moe`): per-position gradient gates
on routers and expert outputs, token-scoped load-balancing and z-losses, router learning-rate
multiplier or freeze, and routing analytics (``moe/*`` metrics, ``<output_dir>/routing.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import GRPOTrainer

from rlvr.config import ForkingConfig, MoEConfig
from rlvr.forking import loss_weights, select_forking_tokens, selection_stats
from rlvr.moe import UnknownMoEArchitecture
from rlvr.moe.adapters import register_zero3_leaf_modules
from rlvr.moe.replay import stitch_forwards, stitch_rollout
from rlvr.moe.updates import RouterAwareUpdates

GROUP_IDS_KEY = "rlvr_group_ids"  # (B,) global prompt index of each row, added to TRL's generation batch
ROUTING_KEY = "rlvr_routing"  # (B, P + C, layers, k) recorded experts for routing replay, travels with the rows

# How each TRL loss type normalises: per sequence, per local micro-batch, or over the generation batch
# of all ranks. "selected" normalisation divides by the selected-token count of the same unit.
PER_SEQUENCE_LOSSES = ("grpo", "sapo", "luspo")
GLOBAL_LOSSES = ("dapo", "cispo", "vespo")

# Completion-token entropy histogram written with each logging step: 8 log-spaced bins per decade over
# [1e-6, 10] nats; values outside are counted in the first/last bin.
ENTROPY_BIN_EDGES = torch.logspace(-6, 1, 57, dtype=torch.float64)


class _GradientMask(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a fixed (B, T) mask."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


@dataclass
class MicroBatchSelection:
    """The forking tokens of the micro-batch being trained on (this rank's rows)."""

    keep: torch.Tensor  # (B, T) bool
    weights: torch.Tensor  # (B, T) float loss weights (0 for dropped tokens and padding)


def _register_zero3_leaves(model: torch.nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, mark the model's sparse MoE blocks as leaf modules (see
    :func:`rlvr.moe.adapters.register_zero3_leaf_modules`); a dense model has none."""
    if not is_deepspeed_zero3_enabled():
        return
    try:
        register_zero3_leaf_modules(model)
    except UnknownMoEArchitecture:
        pass


@contextlib.contextmanager
def _zero3_leaves_as_trl_loads():
    """Register ZeRO-3 leaf modules on every model TRL loads from an id inside ``GRPOTrainer.__init__``.

    Given a model id, TRL builds the policy with ``create_model_from_path`` and, with ``beta > 0``, the
    reference model too, which it hands to DeepSpeed before ``__init__`` returns. Leaf registration
    must happen in between, so TRL's loader is wrapped for the duration of ``__init__``.
    """
    from trl.trainer import grpo_trainer

    original = grpo_trainer.create_model_from_path

    def create_and_register(*args, **kwargs):
        model = original(*args, **kwargs)
        _register_zero3_leaves(model)
        return model

    grpo_trainer.create_model_from_path = create_and_register
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = original


class ForkingGRPOTrainer(GRPOTrainer):
    """GRPO with the policy-gradient loss on the forking tokens (Wang et al., 2025).

    Args:
        forking: which tokens are forking and how the loss treats them (see :class:`rlvr.config.ForkingConfig`).
        moe: router-aware updates and routing analytics (see :class:`rlvr.config.MoEConfig`); ignored
            for dense models when left at its defaults.
        *args, **kwargs: passed to :class:`trl.GRPOTrainer` unchanged. Do not set
            ``args.top_entropy_quantile``: ``forking.rho`` replaces it.
    """

    def __init__(self, *args, forking: ForkingConfig | None = None, moe: MoEConfig | None = None, **kwargs):
        self.forking = forking or ForkingConfig()
        self.moe = moe or MoEConfig()
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):
            _register_zero3_leaves(model)  # before DeepSpeed wraps it (in train())
        with _zero3_leaves_as_trl_loads():  # a model id: TRL loads the policy and the reference model itself
            super().__init__(*args, **kwargs)
        try:
            self.router_updates: RouterAwareUpdates | None = RouterAwareUpdates(
                self.model, self.moe, sum_across_ranks=self._sum_across_ranks, world_size=self.accelerator.num_processes
            )
        except UnknownMoEArchitecture:
            if not self.moe.is_default():
                raise
            self.router_updates = None  # a dense policy: nothing to route
        if self.router_updates is not None and self.moe.freeze_router:
            self.router_updates.freeze_routers()
        reentrant = self.args.gradient_checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get(
            "use_reentrant"
        )
        needs_recorded_routing = (
            self.moe.router_gate_scope != "all"
            or self.moe.expert_gate_scope != "all"
            or self.moe.load_balancing_coef > 0
            or self.moe.z_loss_coef > 0
            or self.moe.routing_replay != "none"
        )
        if self.router_updates is not None and reentrant and needs_recorded_routing:
            raise ValueError(
                "rlvr.moe gates, router losses and routing replay need "
                "gradient_checkpointing_kwargs.use_reentrant=False "
                "(TRL's default): reentrant checkpointing re-runs the forward in backward without the recorded routing"
            )
        self._router_loss: torch.Tensor | None = None
        self.gradient_tokens = 0  # completion tokens with a non-zero policy-gradient weight, this rank, training
        self._replay = self.moe.routing_replay if self.router_updates is not None else "none"
        if self._replay == "rollout" and (self.use_vllm or getattr(self.args, "use_transformers_paged", False)):
            raise ValueError(
                "moe.routing_replay='rollout' records routing inside transformers' generate(), which vLLM and paged "
                "generation bypass; use routing_replay='old_policy' or 'none'"
            )
        self._recording_old_policy = False
        self._recorded_forwards: list[torch.Tensor] | None = None
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                "ForkingGRPOTrainer replaces GRPOConfig.top_entropy_quantile with an exact top-k: pass "
                "forking=ForkingConfig(rho=...) and leave top_entropy_quantile at 1.0"
            )
        # TRL calls get_high_entropy_mask() only when top_entropy_quantile < 1; any value below 1 turns
        # that call on, and our override ignores the quantile.
        self.top_entropy_quantile = 0.0 if self.forking.policy_tokens == "forking" else 1.0
        self._micro_batch: dict | None = None  # inputs of the micro-batch whose loss is being computed
        self._selection: MicroBatchSelection | None = None
        self._loss_entropies: torch.Tensor | None = None
        self._forking_token_counts: Counter[int] = Counter()
        self._forking_examples: list[dict] = []
        self._entropy_histogram = torch.zeros(len(ENTROPY_BIN_EDGES) - 1, dtype=torch.int64)

    # ---------------------------------------------------------------------------------------------
    # Generation batch: remember which prompt each row belongs to (for scope="group").

    def _generate_and_score_completions(self, inputs):
        self._recorded_forwards = None
        self._recording_old_policy = self._replay == "old_policy"
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._recording_old_policy = False
        self._attach_recorded_routing(output)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rows = output["prompt_ids"].size(0)
        # TRL's RepeatSampler puts the completions of one prompt on consecutive global rows, and this
        # rank holds global rows [process_index * rows, (process_index + 1) * rows).
        first_row = self.accelerator.process_index * rows
        output[GROUP_IDS_KEY] = (torch.arange(rows, device=output["prompt_ids"].device) + first_row) // group_size
        return output

    # ---------------------------------------------------------------------------------------------
    # Routing replay: record experts while the data is produced, force them in the loss forwards.

    def _generate_single_turn(self, *args, **kwargs):
        if self._replay != "rollout":
            return super()._generate_single_turn(*args, **kwargs)
        if self._recorded_forwards is not None:
            raise RuntimeError("moe.routing_replay=rollout supports single-turn generation only (no tool calls)")
        hooks = self.router_updates.hooks
        hooks.start_recording()
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            self._recorded_forwards = hooks.stop_recording()

    def _attach_recorded_routing(self, output: dict) -> None:
        forwards, self._recorded_forwards = self._recorded_forwards, None
        if not forwards:
            return
        batch, prompt_length = output["prompt_ids"].shape
        completion_length = output["completion_ids"].shape[1]
        num_experts = self.router_updates.hooks.num_experts
        if self._replay == "rollout":
            output[ROUTING_KEY] = stitch_rollout(forwards, batch, prompt_length, completion_length, num_experts)
        else:
            output[ROUTING_KEY] = stitch_forwards(forwards, batch, prompt_length + completion_length, num_experts)

    # ---------------------------------------------------------------------------------------------
    # Loss: select after the forward, hand TRL the weights.

    def _compute_loss(self, model, inputs):
        self._micro_batch, self._selection = inputs, None
        own_entropy_bonus = (
            self._entropy_bonus_enabled
            and not self.forking.mask_entropy_bonus
            and self.forking.policy_tokens == "forking"
        )
        if own_entropy_bonus:  # TRL would restrict the bonus to the selected tokens; add it ourselves instead
            self._entropy_bonus_enabled = False
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            if own_entropy_bonus:
                self._entropy_bonus_enabled = True
            self._micro_batch = None
        if own_entropy_bonus:
            loss = loss - self.entropy_coef * self._entropy_bonus(inputs, self._loss_entropies)
        if self._router_loss is not None:  # scaled for gradient accumulation like TRL's policy loss
            accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
            loss = loss + self._router_loss / accumulation
        self._loss_entropies, self._router_loss = None, None
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        loss_forward = self._micro_batch is not None and torch.is_grad_enabled()
        if loss_forward and self.router_updates is not None:
            self.router_updates.begin(*input_ids.shape, forced=self._micro_batch.get(ROUTING_KEY))
        # The first policy forward inside generate-and-score is TRL's old-policy forward (reference
        # log-probs come later, from the reference model or with adapters disabled).
        record_old_policy = self._recording_old_policy and model is self.model and self._recorded_forwards is None
        if record_old_policy:
            self.router_updates.hooks.start_recording()
        try:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        except BaseException:
            if self.router_updates is not None:
                self.router_updates.abort()
            raise
        finally:
            if record_old_policy:
                self._recorded_forwards = self.router_updates.hooks.stop_recording()
        if self._micro_batch is not None and entropies is not None:  # the loss forward of _compute_loss
            self._loss_entropies = entropies  # (B, T), with gradient: for the all-token entropy bonus
            self._selection = self._select(entropies.detach(), self._micro_batch)
            if loss_forward and self.router_updates is not None:
                self._finish_router_updates(attention_mask)
            if self.forking.mask_kl and self.beta != 0.0 and torch.is_grad_enabled():
                # The policy term already ignores dropped tokens; this also keeps the KL term's gradient
                # off them. The KL value that TRL logs still covers every token.
                logps = _GradientMask.apply(logps, self._selection.keep)
        return logps, entropies, aux_loss

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

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)  # forward, loss, backward
        finally:
            if self.router_updates is not None:
                self.router_updates.release()

    def _sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum")

    def _finish_router_updates(self, attention_mask: torch.Tensor) -> None:
        """Gates, router losses and analytics of the loss forward, now that the forking tokens are known."""
        mode = "train" if self.model.training else "eval"
        self._router_loss, metrics = self.router_updates.finish(
            attention_mask, self._loss_mask(self._micro_batch), self._selection.keep, analytics=self.moe.analytics
        )
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

    def create_optimizer(self, *args, **kwargs):
        """TRL's optimizer, with the router parameters in their own groups at ``lr x moe.router_lr_multiplier``."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.router_updates is None or self.moe.router_lr_multiplier == 1.0:
            return optimizer
        router_ids = {id(p) for p in self.router_updates.router_parameters()}
        for group in list(optimizer.param_groups):
            routers = [p for p in group["params"] if id(p) in router_ids]
            if not routers:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in router_ids]
            optimizer.add_param_group({**group, "params": routers, "lr": group["lr"] * self.moe.router_lr_multiplier})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Loss weights of the forking tokens (replaces TRL's ``entropy >= quantile`` mask)."""
        if self._selection is None:  # called outside _compute_loss: select on the spot
            keep = select_forking_tokens(entropies, mask, self.forking.rho, self.forking.selection, "sequence")
            return loss_weights(keep, mask, self.forking.loss_normalization, per_sequence=True)
        return self._selection.weights

    def _loss_mask(self, inputs: dict) -> torch.Tensor:
        """TRL's per-token loss mask: completion tokens, minus tool-output tokens."""
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def _select(self, entropies: torch.Tensor, inputs: dict) -> MicroBatchSelection:
        """Exact-k selection over this micro-batch (all ranks), as this rank's keep mask and loss weights."""
        mask = self._loss_mask(inputs).bool()  # (B, T)
        group_ids = inputs.get(GROUP_IDS_KEY)
        if group_ids is None:
            group_ids = torch.arange(mask.size(0), device=mask.device)
        world = self.accelerator.num_processes
        if world > 1:  # k is counted over the micro-batch of every rank: gather, select, keep our rows
            all_entropies = self.accelerator.gather(self.accelerator.pad_across_processes(entropies, dim=1))
            all_mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))
            all_group_ids = self.accelerator.gather(group_ids)
        else:
            all_entropies, all_mask, all_group_ids = entropies, mask, group_ids
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

        loss_type = self.loss_type
        totals = None
        if loss_type in GLOBAL_LOSSES:
            totals = (all_mask.sum(), (all_keep & all_mask.bool()).sum())
        weights = loss_weights(
            keep,
            mask,
            self.forking.loss_normalization,
            per_sequence=loss_type in PER_SEQUENCE_LOSSES,
            totals=totals,
        ).to(entropies.dtype)
        self._record(all_entropies, all_mask, all_keep, inputs, keep)
        return MicroBatchSelection(keep=keep, weights=weights)

    def _entropy_bonus(self, inputs: dict, entropies: torch.Tensor) -> torch.Tensor:
        """Mean entropy over all completion tokens, scaled for gradient accumulation (as TRL does)."""
        mask = self._loss_mask(inputs).to(entropies.dtype)
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation

    # ---------------------------------------------------------------------------------------------
    # Logging

    def _record(self, all_entropies, all_mask, all_keep, inputs, keep) -> None:
        """Selection metrics (over all ranks) and examples of forking tokens (this rank)."""
        mode = "train" if self.model.training else "eval"
        stats = selection_stats(all_entropies, all_mask, all_keep, self.forking.selection)
        metrics = self._metrics[mode]
        metrics["forking/threshold"].append(stats.threshold)
        metrics["forking/kept_fraction"].append(stats.kept_fraction)
        metrics["forking/kept_tokens"].append(float(stats.kept_tokens))
        metrics["forking/entropy_kept"].append(stats.entropy_kept)
        metrics["forking/entropy_dropped"].append(stats.entropy_dropped)
        if mode == "train" and torch.is_grad_enabled():
            loss_mask = self._loss_mask(inputs).bool()
            counted = keep & loss_mask if self.forking.policy_tokens == "forking" else loss_mask
            self.gradient_tokens += int(counted.sum())
        if not self.accelerator.is_main_process or mode != "train":
            return
        values = all_entropies.detach()[all_mask.bool()].to("cpu", torch.float64)  # every rank's tokens
        bins = torch.bucketize(values, ENTROPY_BIN_EDGES[1:-1])
        self._entropy_histogram += torch.bincount(bins, minlength=len(self._entropy_histogram))
        completion_ids = inputs["completion_ids"]
        self._forking_token_counts.update(completion_ids[keep].tolist())
        if len(self._forking_examples) < self.forking.log_examples:
            for row in range(min(completion_ids.size(0), self.forking.log_examples - len(self._forking_examples))):
                real = self._loss_mask(inputs)[row].bool()
                self._forking_examples.append(
                    {"token_ids": completion_ids[row][real].tolist(), "forking": keep[row][real].tolist()}
                )

    def _decode_example(self, example: dict) -> str:
        """The completion with each forking token wrapped in « »."""
        tokenizer = self.processing_class
        pieces = []
        for token_id, is_forking in zip(example["token_ids"], example["forking"], strict=True):
            text = tokenizer.decode([token_id])
            pieces.append(f"«{text}»" if is_forking else text)
        return "".join(pieces)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for function in self.reward_funcs:  # failure, timeout and parse-failure counts of rlvr's reward functions
            pop_stats = getattr(function, "pop_stats", None)
            if callable(pop_stats) and "loss" in logs:
                logs.update(pop_stats().as_metrics(getattr(function, "__name__", type(function).__name__)))
        examples, counts = self._forking_examples, self._forking_token_counts
        self._forking_examples, self._forking_token_counts = [], Counter()
        histogram, self._entropy_histogram = self._entropy_histogram, torch.zeros_like(self._entropy_histogram)
        super().log(logs, start_time)
        if not self.accelerator.is_main_process:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        if self.router_updates is not None:
            loads = self.router_updates.pop_expert_loads()
            if loads:  # per-layer expert loads on forking vs other tokens, for the report's heatmaps
                with open(os.path.join(self.args.output_dir, "routing.jsonl"), "a") as handle:
                    handle.write(json.dumps({"step": self.state.global_step, "expert_load": loads}) + "\n")
        if not (examples or counts):
            return
        tokenizer = self.processing_class
        record = {
            "step": self.state.global_step,
            "examples": [self._decode_example(example) for example in examples],
            "top_forking_tokens": [[tokenizer.decode([token]), count] for token, count in counts.most_common(20)],
            "entropy_histogram": {"edges": ENTROPY_BIN_EDGES.tolist(), "counts": histogram.tolist()},
        }
        with open(os.path.join(self.args.output_dir, "forking_tokens.jsonl"), "a") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
