"""A rollout engine with numerics of its own: the training-inference mismatch of real MoE runs, on CPU.

Real MoE RL samples with an inference engine (vLLM, SGLang) whose kernels and precision differ from the
trainer's, and for MoE policies that difference flips routing decisions (Ma et al., 2025, arXiv
2510.11370). :class:`CopyEngine` reproduces that setting without one: it samples with a separate copy of
the policy's weights, synced after every optimizer step as vLLM's colocate mode is, in its own dtype
(e.g. bfloat16 while training in float32), optionally with noise on every router's logits
(:class:`RouterNoise`, relative to the logits' spread) to stand in for engine kernels.

Like vLLM it returns what an engine returns: completion token ids, the sampling log-prob of each token
(of the processed distribution it sampled from, vLLM's ``processed_logprobs``), and the routed experts
of every token it ran, in vLLM 0.14-0.20's layout (``[P + C - 1, layers, k]`` per completion), which
:func:`rlvr.rollouts.engine_routing.engine_routing_record` turns into a replay record, as it does for vLLM.
Single process and DDP (each rank keeps its own copy of the unwrapped policy); not ZeRO-3.

:class:`CopyEngineGeneration` puts it behind TRL's vLLM generator interface, so that TRL treats its samples
exactly as vLLM's (``rollout.engine: copy``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor

from rlvr.moe.adapters import MoELayer, UnknownMoEArchitecture, find_moe_layers
from rlvr.moe.hooks import RoutingHooks
from rlvr.moe.replay import rollout_record
from rlvr.moe.updates import correction_bias
from rlvr.rollouts.engine_routing import EngineRouting, engine_routing_record
from rlvr.rollouts.tree import completion_lengths, left_pad, right_pad
from rlvr.tuning.plain import plain_copy, plain_state


class RouterNoise:
    """Forward hooks that route every MoE layer of a model from noisy logits.

    Each router call adds ``scale * std(logits) * N(0, 1)`` to the (N, E) logits (std over experts, per
    token), chooses the top-k experts from the noisy routing scores (plus the router's correction bias
    where it has one; DeepSeek-V3's group-limited choice is not reproduced) and recomputes the gate
    weights from the noisy logits as the router would."""

    def __init__(self, layers: list[MoELayer], scale: float, seed: int = 0):
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        self._handles = [layer.router.register_forward_hook(self._hook(layer), prepend=True) for layer in layers]

    def _hook(self, layer: MoELayer):
        def hook(module, inputs, output):
            logits, weights, indices = layer.adapter.unpack(output, module)
            noise = torch.randn(logits.shape, generator=self.generator, dtype=torch.float32).to(logits.device)
            spread = logits.float().std(dim=-1, keepdim=True)  # (N, 1)
            noisy = (logits.float() + self.scale * spread * noise).to(logits.dtype)  # (N, E)
            scores = layer.adapter.router_probabilities(noisy)
            bias = correction_bias(layer)
            if bias is not None:
                scores = scores + bias.to(scores.dtype)
            chosen = torch.topk(scores, indices.shape[-1], dim=-1).indices.to(indices.dtype)  # (N, k)
            gate = layer.adapter.gate_weights(noisy, chosen, module).to(weights.dtype)
            return layer.adapter.pack(noisy, gate, chosen, output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _plain_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``policy`` as an engine loads it: the class's own forwards, no hooks. A trainer patches
    its policy's forward (TRL's fused LM head, rlvr's sparse head) with closures over the policy itself and
    hooks its routers; a copy that kept them would run the policy's forward and the trainer's hooks. Adapters
    (LoRA, SVF) are folded into the copy's weights (:func:`rlvr.tuning.plain.plain_copy`)."""
    model = plain_copy(policy)
    for module in model.modules():
        module.__dict__.pop("forward", None)
        module._forward_hooks.clear()
        module._forward_hooks_with_kwargs.clear()
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks_with_kwargs.clear()
    return model


@dataclass
class EngineOutput:
    """What the engine returned for a batch, per row: as vLLM returns it."""

    completion_ids: list[list[int]]  # EOS included, no padding
    logprobs: list[list[float]]  # sampling log-prob of each completion token
    routed_experts: list[np.ndarray] | None  # [P + C - 1, layers, k] int32 per row; None for a dense policy

    def routings(self) -> list[EngineRouting] | None:
        """The routed experts per row as the engine-agnostic :class:`EngineRouting` (None: a dense policy)."""
        return None if self.routed_experts is None else [EngineRouting(rows) for rows in self.routed_experts]


class SampledTokenLogProbs(LogitsProcessor):
    """The log-prob of each sampled token under the processed distribution it was drawn from (vLLM's
    ``processed_logprobs``), kept as (B,) per step: O(B x C) in all, never the (B, C, V) scores that
    ``output_scores`` would hold.

    It must see the scores after every warper (temperature, top-k, top-p, ...), which transformers applies
    after user processors: :meth:`last_processor_of` appends it to the list ``generate`` builds. Each call
    keeps the step's (B, V) log-softmax until the next call, whose ``input_ids`` end with the token sampled
    from it; :meth:`finish` reads the last step's token.
    """

    def __init__(self):
        self.pending: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is not yet known
        self.steps: list[torch.Tensor] = []  # per step (B,) float32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))  # (B,)
        self.pending = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C) log-probs, given the (B,) tokens of the last step."""
        if self.pending is not None:
            self._take(last_tokens)
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)

    @contextlib.contextmanager
    def last_processor_of(self, model):
        """While open, ``model.generate`` runs this after every processor and warper it builds."""
        build = model._get_logits_processor  # transformers' own list (processors, user's, then the warpers)

        def with_recorder(*args, **kwargs):
            processors = build(*args, **kwargs)
            processors.append(self)
            return processors

        model._get_logits_processor = with_recorder
        try:
            yield self
        finally:
            del model._get_logits_processor  # the class's method again


class CopyEngine:
    """Samples with a copy of the policy in its own dtype, optionally with router noise.

    Args:
        policy: the (unwrapped) policy; the copy is made once and synced with :meth:`sync`.
        dtype: the engine's precision (e.g. ``torch.bfloat16``).
        router_noise: noise on the router logits, in units of their std over experts (0: none).
        seed: the noise's random stream.
    """

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype, router_noise: float = 0.0, seed: int = 0):
        self.dtype = dtype
        self.model = _plain_copy(policy).to(dtype).eval().requires_grad_(False)
        try:
            layers = find_moe_layers(self.model)
        except UnknownMoEArchitecture:
            layers = []
        if router_noise and not layers:
            raise ValueError("rollout.router_noise needs an MoE policy (there is no router to perturb)")
        # recording hooks first: the noise hooks (prepend=True) run before them, so the noisy choice is recorded
        self.hooks = RoutingHooks(self.model, gate_routers=False, gate_experts=False) if layers else None
        self.noise = RouterNoise(layers, router_noise, seed) if router_noise else None
        self.synced_step: int | None = None

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, step: int | None = None) -> None:
        """Copy the policy's current weights and buffers into the engine (cast to its dtype), adapters folded in
        as TRL's vLLM weight sync folds them (:func:`rlvr.tuning.plain.plain_state`)."""
        engine_state = self.model.state_dict()
        with plain_state(policy) as policy_state:
            if engine_state.keys() != policy_state.keys():
                missing = sorted(engine_state.keys() ^ policy_state.keys())[:3]
                raise ValueError(f"the engine copy and the policy have different weights (e.g. {missing})")
            for name, tensor in engine_state.items():
                source = policy_state[name].detach()
                tensor.copy_(source.to(tensor.dtype) if tensor.is_floating_point() else source)
        self.synced_step = step

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        generation_config: GenerationConfig,
        pad_token_id: int,
        eos_token_ids: list[int],
    ) -> EngineOutput:
        input_ids, attention_mask = left_pad(prompt_ids, pad_token_id)  # (B, P)
        device = next(self.model.parameters()).device
        if self.hooks is not None:
            self.hooks.start_recording()
        sampled = SampledTokenLogProbs()
        try:
            with sampled.last_processor_of(self.model):
                output = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=generation_config,
                )
        finally:
            forwards = self.hooks.stop_recording() if self.hooks is not None else None
        sequences = getattr(output, "sequences", output)  # (B, P + C); a dict if the config asks for one
        prompt_width = input_ids.shape[1]
        completions = sequences[:, prompt_width:]  # (B, C)
        # log-prob of each sampled token under the processed distribution it was drawn from
        logprobs = sampled.finish(completions[:, -1]).cpu()  # (B, C)
        completions = completions.cpu()
        lengths = completion_lengths(completions, eos_token_ids)  # (B,)
        completion_ids = [completions[row, : int(lengths[row])].tolist() for row in range(len(prompt_ids))]
        token_logprobs = [logprobs[row, : int(lengths[row])].tolist() for row in range(len(prompt_ids))]
        routed = None
        if forwards is not None:
            record = rollout_record(forwards, len(prompt_ids))
            routed = []
            for row, prompt in enumerate(prompt_ids):
                steps = max(int(lengths[row]) - 1, 0)
                rows = torch.cat([record.prompt[row, prompt_width - len(prompt) :], record.completion[row, :steps]])
                routed.append(rows.numpy().astype(np.int32))
        return EngineOutput(completion_ids, token_logprobs, routed)

    def replay_record(
        self, output: EngineOutput, prompts: list[list[int]], prompt_width: int, completion_width: int
    ) -> torch.Tensor:
        """The routed experts of ``output`` (sampled for ``prompts``) over a (B, P + C) training input, through
        :func:`rlvr.rollouts.engine_routing.engine_routing_record` as vLLM's are: (B, P + C, layers, k)."""
        routings = output.routings()
        if routings is None:
            raise ValueError("a dense policy routes nothing")
        return engine_routing_record(
            routings,
            [len(prompt) for prompt in prompts],
            [len(completion) for completion in output.completion_ids],
            prompt_width,
            completion_width,
            self.hooks.num_experts,
            self.hooks.layers[0].top_k,
            list(range(len(self.hooks.layers))),  # one entry per MoE layer, in rlvr's order
        )

    def remove(self) -> None:
        """Detach the engine's hooks (the copy itself is dropped with the engine)."""
        if self.noise is not None:
            self.noise.remove()
        if self.hooks is not None:
            self.hooks.remove()


class CopyEngineGeneration:
    """The copy engine behind the interface of TRL's ``VLLMGeneration`` (``sync_weights``, ``generate``).

    A trainer that hands this object to TRL as its vLLM generator runs TRL's own vLLM code path on the copy
    engine, unchanged: weights synced whenever the optimizer step changed, sampling log-probs kept, the
    importance-sampling correction in every mode TRL has, and TRL's ``sampling/*`` metrics.

    Args:
        engine: the :class:`CopyEngine`.
        policy: returns the current (unwrapped) policy, whose weights :meth:`sync_weights` copies.
        generation_config: how to sample (TRL's ``GenerationConfig``: temperature, top-k/p, length).
        pad_token_id, eos_token_ids: the tokenizer's.
    """

    def __init__(self, engine: CopyEngine, policy, generation_config, pad_token_id: int, eos_token_ids: list[int]):
        self.engine, self.policy = engine, policy
        self.generation_config, self.pad_token_id, self.eos_token_ids = generation_config, pad_token_id, eos_token_ids
        self.syncs = 0
        self._routing: list[EngineRouting] | None = None

    def sync_weights(self) -> None:
        self.engine.sync(self.policy())
        self.syncs += 1

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None):
        """One completion per row of ``prompts`` (TRL's colocate mode: the prompts are already repeated
        ``num_generations`` times). Returns TRL's ``(prompt_ids, completion_ids, logprobs, logprob_token_ids)``
        with one sampling log-prob per token."""
        if images is not None and any(image is not None for image in images):
            raise ValueError("rollout.engine=copy supports text-only prompts")
        with profiler if profiler is not None else contextlib.nullcontext():
            output = self.engine.generate(prompts, self.generation_config, self.pad_token_id, self.eos_token_ids)
        self._routing = output.routings()
        logprobs = [[[value] for value in row] for row in output.logprobs]
        return prompts, output.completion_ids, logprobs, None

    def take_routing(self) -> list[EngineRouting] | None:
        """The routed experts of the last :meth:`generate` call, per row (None: a dense policy)."""
        routing, self._routing = self._routing, None
        return routing


@dataclass
class TrainerView:
    """An engine's samples as the trainer sees them (:func:`teacher_forced`)."""

    logprobs: torch.Tensor  # (B, C) float64 log-probs of the completion tokens at the sampling temperature
    completion_mask: torch.Tensor  # (B, C)
    experts: torch.Tensor | None  # (B, P + C, layers, k) experts the policy's own routers chose; None if dense
    prompt_width: int  # P


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    temperature: float = 1.0,
) -> TrainerView:
    """The policy's log-probs and live routing of sampled completions, in one forward over the left-padded
    prompts and right-padded completions (the layout of a training batch), as the trainer's old-policy
    forward computes them: the reference the mismatch of an engine is measured against."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)  # (B, P)
    completion_ids, completion_mask = right_pad(completions, pad_token_id)  # (B, C)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    try:
        hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    except UnknownMoEArchitecture:
        hooks = None
    if hooks is not None:
        hooks.start_recording()
    try:
        device = next(model.parameters()).device
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        ).logits.cpu()  # (B, P + C, V)
    finally:
        forwards = hooks.stop_recording() if hooks is not None else None
        if hooks is not None:
            hooks.remove()
    width = prompt_ids.shape[1]
    scores = torch.log_softmax(logits[:, width - 1 : -1].double() / temperature, dim=-1)  # (B, C, V)
    logprobs = scores.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, C)
    experts = None
    if forwards:
        experts = forwards[0].cpu().reshape(*input_ids.shape, *forwards[0].shape[1:])
    return TrainerView(logprobs, completion_mask, experts, width)
