"""Two forwards the trainer runs instead of TRL's: the loss forward through the sparse LM head, and TRL's
no-grad forward with an engine's experts replayed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from rlvr.moe.hooks import RoutingHooks
from rlvr.training.sparse_head import MULTIMODAL_KEYS, HeadTransform, sparse_completion_logprobs


def sparse_loss_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    select: Callable[[torch.Tensor], torch.Tensor],
    transform: HeadTransform,
    kernel: str,
    cast_lm_head_to_fp32: bool,
    autocast: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss forward through :func:`rlvr.training.sparse_head.sparse_completion_logprobs`: every completion
    token's log-prob and entropy without a graph, ``select`` ((B, T) entropies -> (B, T) bool kept tokens),
    then the LM head with gradient on the selected tokens only.

    Args:
        model: the policy as the trainer calls it (DDP/DeepSpeed wrappers kept), patched by
            :func:`rlvr.training.sparse_head.add_sparse_head_route`.
        input_ids, attention_mask: (B, L) prompt and completion; the last ``logits_to_keep`` are the completion.
        transform: the policy's logit transform (temperature, soft-capping, scale).
        kernel: ``forking.sparse_head_kernel``.
        cast_lm_head_to_fp32: TRL's ``cast_lm_head_to_fp32``.
        autocast: the accelerator's autocast context.

    Returns:
        (B, T) log-probs and entropies, as TRL's forward does.
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, L), as TRL scores
    labels[:, :-logits_to_keep] = -100

    def head(hidden, shifted_labels, lm_head):  # (B, L-1, H), (B, L-1)
        hidden, shifted_labels = hidden[:, -logits_to_keep:], shifted_labels[:, -logits_to_keep:]
        fp32 = cast_lm_head_to_fp32
        with torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            return sparse_completion_logprobs(
                hidden.float() if fp32 else hidden,
                shifted_labels,
                lm_head,
                transform,
                select,
                gather=lambda: maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias),
                kernel=kernel,
            )

    with autocast():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, sparse_head=head)


def replayed_forward(
    forward: Callable,
    hooks: RoutingHooks,
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    forced: torch.Tensor,
    *args,
    **kwargs,
):
    """TRL's no-grad forward (``forward``: ``GRPOTrainer._get_per_token_logps_and_entropies``), in the row
    chunks TRL would use, with ``forced`` (B, L, layers, k) experts replayed in each (the routers' own
    choice is recorded by the surrounding ``old_policy_forward``). Returns TRL's (logps, entropies, aux)."""
    if args or any(kwargs.get(key) is not None for key in MULTIMODAL_KEYS):
        raise ValueError("moe.routing_replay=rollout with an engine supports text-only batches")
    options = {key: value for key, value in kwargs.items() if key not in MULTIMODAL_KEYS and key != "batch_size"}
    rows = kwargs.get("batch_size") or input_ids.size(0)
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), rows):
        chunk = slice(start, start + rows)
        hooks.begin(*input_ids[chunk].shape, forced=forced[chunk].to(input_ids.device))
        try:
            chunk_logps, chunk_entropies, chunk_aux = forward(
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
def measure_forward(trainer, batch: dict) -> torch.Tensor:
    """The policy's (B, C) log-probs of an engine-sampled batch, for its mismatch metrics, when TRL ran no
    old-policy forward on it (no importance-sampling correction, one optimizer step per batch)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P + C)
    completion_width, rows = batch["completion_ids"].size(1), trainer.args.per_device_train_batch_size
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, completion_width, batch_size=rows
    )
    return logps


def sparse_forward(trainer, model, input_ids, attention_mask, logits_to_keep):
    """The loss forward of ``trainer`` with the LM head's gradient on the forking tokens only
    (:mod:`rlvr.training.sparse_head`): the forking selection runs inside the forward, on the entropies."""
    state = trainer.loss_forward

    def select(entropies: torch.Tensor) -> torch.Tensor:
        state.selection = trainer._select(entropies, state.inputs)
        return state.selection.keep

    return sparse_loss_forward(
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        select,
        trainer.head_transform,
        trainer.forking.sparse_head_kernel,
        trainer.args.cast_lm_head_to_fp32,
        trainer.accelerator.autocast,
    )
