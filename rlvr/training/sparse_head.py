"""The LM head on forking tokens only: the policy gradient's projection paid for the selected positions.

With forking-token updates (*Beyond the 80/20 Rule*, Wang et al., 2025) about 80% of the completion
tokens carry a policy-gradient weight of exactly zero. TRL's fused LM head still recomputes the logits
of every scored position in backward and multiplies those zeros through the vocabulary projection.
Here the loss forward is split in three, on the hidden states the backbone returns with gradient:

1. every completion position's log-prob and entropy, in row chunks, **without** a graph;
2. the forking-token selection on those entropies (the caller's ``select``);
3. the selected positions only, through :class:`SelectedLogProbs`, a chunked projection whose backward
   recomputes the logits of those rows.

The log-probs of dropped positions stay in the returned tensor as constants: their loss weight is 0,
so TRL's ratio, clipping and metrics see the same values and the gradient is the same.

Logits follow TRL's fused head: ``softcap * tanh(logit_scale * (h W^T + b) / softcap) / temperature``
(softcap only where the model has one). Softmax statistics are accumulated in at least float32 and
in float64 for a float64 model, so the float64 tests compare against a plain reference to 1e-10.

When it applies is :func:`sparse_head_blockers` (the trainer settings under which it is exact);
:func:`add_sparse_head_route` gives a TRL-patched model the forward that hands its hidden states to
:func:`sparse_completion_logprobs`.

Shapes: ``N`` scored rows, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model

# Rows per chunk: a (rows, V) logits tile of at most 2**26 elements (256 MB in float32).
TILE_ELEMENTS = 2**26


@dataclass(frozen=True)
class HeadTransform:
    """What turns ``h W^T + b`` into the sampling distribution's logits (as TRL's fused head reads it)."""

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0

    @classmethod
    def of(cls, model_config, temperature: float) -> HeadTransform:
        """The model's softcap and logit scale, read from its text config as ``trl.add_fused_lm_head`` reads them."""
        text = model_config.get_text_config()
        scale = getattr(text, "logit_scale", None)
        if scale is None:
            scale = getattr(text, "output_multiplier", None)
        if scale is None:
            scale = getattr(text, "lm_head_multiplier", None)
        if scale is None and getattr(text, "logits_scaling", None) is not None:
            scaling = text.logits_scaling
            scale = scaling if text.model_type == "hyperclovax" else 1 / scaling
        return cls(temperature, getattr(text, "final_logit_softcapping", None), 1.0 if scale is None else scale)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """(n, V) ``h W^T + b`` -> the temperature-scaled logits, in at least float32."""
        z = raw.to(torch.promote_types(raw.dtype, torch.float32)) * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature

    def logits_grad(self, raw: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """Chain rule through :meth:`logits`: d loss / d raw from d loss / d logits, both (n, V)."""
        scale = self.logit_scale / self.temperature
        if self.softcap is None:
            return grad_logits * scale
        z = raw.to(grad_logits.dtype) * self.logit_scale
        return grad_logits * (1.0 - torch.tanh(z / self.softcap) ** 2) * scale


def _row_chunks(rows: int, vocab: int):
    """``(start, end)`` of row chunks whose (rows, V) logits tile stays under :data:`TILE_ELEMENTS`."""
    step = max(1, TILE_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 heads (as TRL's kernel), float64 for a float64 head."""
    return torch.promote_types(weight.dtype, torch.float32)


def _raw_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    raw = hidden.to(weight.dtype) @ weight.t()  # (n, V)
    return raw if bias is None else raw + bias


def _matmul(a: torch.Tensor, b: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``b``'s dtype with the result in ``accumulate`` (float32 output of a bf16 GEMM where the
    device has one), without a float32 copy of a half-precision LM head."""
    if b.dtype == accumulate:
        return a.to(accumulate) @ b
    try:
        return torch.mm(a.to(b.dtype), b, out_dtype=accumulate)
    except (RuntimeError, TypeError):  # no mixed-dtype GEMM on this device
        return (a.to(b.dtype) @ b).to(accumulate)


def _score_rows(hidden, weight, bias, targets, transform: HeadTransform, entropy: bool):
    """(N,) target log-probs, log Z and (if asked) entropies of the rows, one logits chunk at a time."""
    logps = torch.empty(hidden.shape[0], dtype=accumulation_dtype(weight), device=hidden.device)
    log_z, entropies = torch.empty_like(logps), torch.empty_like(logps) if entropy else None
    for start, end in _row_chunks(hidden.shape[0], weight.shape[0]):
        logits = transform.logits(_raw_logits(hidden[start:end], weight, bias))  # (n, V)
        log_z[start:end] = torch.logsumexp(logits, dim=-1)
        logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - log_z[start:end]
        if entropy:
            probabilities = torch.exp(logits - log_z[start:end, None])
            entropies[start:end] = log_z[start:end] - (probabilities * logits).sum(-1)
    return logps, log_z, entropies


@torch.no_grad()
def logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: HeadTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of each row's distribution, (N,) each, without a graph.

    Args:
        hidden: (N, H) hidden states of the scored positions.
        weight, bias: (V, H) and (V,) the LM head.
        targets: (N,) next-token ids.
    """
    logps, _, entropy = _score_rows(hidden, weight, bias, targets, transform, entropy=True)
    return logps, entropy


class SelectedLogProbs(torch.autograd.Function):
    """Log-probs of the selected rows, (N,), with a backward that recomputes their logits in chunks.

    Nothing of size (N, V) is kept for backward: only ``hidden`` (N, H), the targets and ``log Z``.
    Gradients accumulate in :func:`accumulation_dtype`; the backward recomputes under the forward's autocast.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform: HeadTransform, gather: Callable):
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        with gather():
            logps, log_z, _ = _score_rows(hidden, weight, bias, targets, transform, entropy=False)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.transform, ctx.gather = transform, gather
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        transform = ctx.transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        device, autocast_dtype, autocast_enabled = ctx.autocast
        with ctx.gather():
            accumulate = accumulation_dtype(weight)
            grad_hidden = torch.zeros(hidden.shape, dtype=accumulate, device=hidden.device) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
            for start, end in _row_chunks(hidden.shape[0], weight.shape[0]):
                rows = hidden[start:end]
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled):  # as in forward
                    raw = _raw_logits(rows, weight, bias)  # (n, V), recomputed
                logits = transform.logits(raw)
                # d logp / d logits = onehot(target) - softmax
                grad_logits = -torch.exp(logits - log_z[start:end, None])
                grad_logits.scatter_add_(1, targets[start:end, None], torch.ones_like(grad_logits[:, :1]))
                grad_logits *= grad_logps[start:end, None].to(accumulate)
                grad_raw = transform.logits_grad(raw, grad_logits)  # (n, V)
                if need_hidden:
                    grad_hidden[start:end] = _matmul(grad_raw, weight, accumulate)
                if need_weight:
                    grad_weight += _matmul(grad_raw.t(), rows, accumulate)
                if need_bias:
                    grad_bias += grad_raw.sum(0)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


# TRL's fused head: vocabulary tile width of its ChunkedLogProbFunction calls (trl.trainer.utils)
FUSED_VOCAB_CHUNK = 32768
KERNELS = ("auto", "rlvr", "trl")
# Device types whose sparse head runs through TRL's fused kernel under kernel="auto": its Triton kernels run
# there; elsewhere rlvr's chunks are faster (benchmarks/lm_head.py on CPU)
FUSED_KERNEL_DEVICES = ("cuda", "xpu")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``auto`` -> ``trl`` on the devices of :data:`FUSED_KERNEL_DEVICES`, ``rlvr`` elsewhere."""
    if kernel not in KERNELS:
        raise ValueError(f"sparse head kernel must be one of {KERNELS}; got {kernel!r}")
    if kernel == "auto":
        return "trl" if device.type in FUSED_KERNEL_DEVICES else "rlvr"
    return kernel


def fused_logprobs(hidden, weight, bias, targets, transform: HeadTransform, entropy: bool):
    """(N,) target log-probs (and entropies) through TRL's ``ChunkedLogProbFunction``: cuBLAS tiles in the
    compute dtype (bf16 under autocast), float32 statistics folded in one Triton pass (torch ops on devices
    without Triton), a backward that recomputes each tile. Differentiable when ``hidden`` needs grad."""
    from trl.kernels import ChunkedLogProbFunction

    logps, entropies, *_ = ChunkedLogProbFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        transform.temperature,
        FUSED_VOCAB_CHUNK,
        transform.softcap,
        transform.logit_scale,
        ("entropy",) if entropy else (),
    )
    return logps, entropies


def sparse_completion_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    transform: HeadTransform,
    select: Callable[[torch.Tensor], torch.Tensor],
    gather: Callable = nullcontext,
    kernel: str = "rlvr",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of a completion, with a graph only through the selected tokens.

    Args:
        hidden: (B, T, H) hidden states that predict the completion tokens, with gradient.
        labels: (B, T) completion token ids, -100 where nothing is scored (padding).
        lm_head: the output embedding (its ``weight`` (V, H) and ``bias``).
        select: (B, T) entropies (no graph; 0 where nothing is scored) -> (B, T) bool selected tokens.
        gather: context manager that makes the head's weight whole (ZeRO-3), entered in forward and backward.
        kernel: ``rlvr`` (row chunks, statistics in at least float32: the CPU path) or ``trl`` (both passes
            through TRL's fused ``ChunkedLogProbFunction``: a no-grad pass over every scored row, then one with
            gradient over the selected rows; TRL's numerics); ``auto`` picks by device (:func:`resolve_kernel`).

    Returns:
        log_probs: (B, T); the selected tokens' entries carry the graph, the others are constants.
        entropy: (B, T), no graph.
    """
    kernel = resolve_kernel(kernel, hidden.device)
    scored = labels != -100  # (B, T)
    weight, bias = lm_head.weight, lm_head.bias
    with gather():
        if kernel == "trl":
            with torch.no_grad():
                logps_all, entropy_all = fused_logprobs(
                    hidden[scored], weight, bias, labels[scored], transform, entropy=True
                )
        else:
            logps_all, entropy_all = logprobs_and_entropy(hidden[scored], weight, bias, labels[scored], transform)
    log_probs = logps_all.new_zeros(labels.shape).masked_scatter(scored, logps_all)  # (B, T), TRL's float32 (or 64)
    entropy = entropy_all.new_zeros(labels.shape).masked_scatter(scored, entropy_all)
    selected = select(entropy) & scored  # (B, T)
    if kernel == "trl":
        with gather():  # TRL's backward gathers the head itself
            logps_selected, _ = fused_logprobs(
                hidden[selected], weight, bias, labels[selected], transform, entropy=False
            )
    else:
        logps_selected = SelectedLogProbs.apply(hidden[selected], weight, bias, labels[selected], transform, gather)
    # masked_scatter keeps the output connected to the model even when nothing is selected (a zero gradient)
    return log_probs.masked_scatter(selected, logps_selected), entropy


def add_sparse_head_route(model) -> None:
    """Give ``model`` (already patched by ``trl.add_fused_lm_head``) a second route through its forward:
    ``model(..., labels=labels, sparse_head=head)`` runs the backbone and returns
    ``head(hidden (B, L-1, H), labels (B, L-1), lm_head)``, the hidden states shifted to predict the labels.

    Going through ``model(...)`` keeps the wrappers (DDP, DeepSpeed, accelerate's autocast) in the loop.
    Without ``sparse_head`` the forward is TRL's, unchanged.
    """
    fused_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, sparse_head=None, **kwargs):
        if sparse_head is None:
            return fused_forward(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("fused_lm_head", None)
        kwargs["use_cache"] = False
        backbone = getattr(self, "get_base_model", lambda: self)().base_model  # PEFT: inside the wrapper
        hidden = backbone(*args, **kwargs).last_hidden_state[:, :-1]  # (B, L-1, H)
        lm_head = self.get_output_embeddings()
        return sparse_head(hidden.to(lm_head.weight.device), labels[:, 1:].to(lm_head.weight.device), lm_head)

    model.forward = types.MethodType(forward, model)


# _get_per_token_logps_and_entropies keyword arguments of multimodal inputs (the sparse head is text-only)
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
SPARSE_HEAD_MAX_RHO = 0.75  # above it, a no-grad pass over all tokens plus the selected backward costs more


def sparse_head_blockers(trainer) -> list[str]:
    """Why the sparse head would not give a ``ForkingGRPOTrainer``'s gradient exactly (or would not pay off
    under ``auto``); empty when it applies. The policy loss must be the only term that needs gradients on
    dropped tokens' log-probs, and the loss forward must be the text-only one this module reproduces."""
    setting = trainer.forking.sparse_lm_head
    blockers = []
    if trainer.forking.policy_tokens != "forking":
        blockers.append("forking.policy_tokens=all puts every token in the loss")
    if trainer.beta != 0.0 and not trainer.forking.mask_kl:
        blockers.append("the KL penalty (beta > 0) needs gradients on every token; forking.mask_kl=true keeps it off")
    if trainer._entropy_bonus_enabled:
        blockers.append("the entropy bonus needs entropy gradients")
    if trainer.importance_sampling_level != "token":
        blockers.append("sequence-level importance sampling puts every token's log-prob in the ratio")
    if trainer.aux_loss_enabled:
        blockers.append("TRL's router aux loss (grpo.router_aux_loss_coef) comes from its fused forward")
    if is_peft_model(trainer.model) and hasattr(trainer.model.get_output_embeddings(), "base_layer"):
        blockers.append("the LM head carries a PEFT adapter")
    if setting == "auto" and not blockers and trainer.forking.rho >= SPARSE_HEAD_MAX_RHO:
        blockers.append(f"rho >= {SPARSE_HEAD_MAX_RHO}: the selected tokens are most of the work")
    if setting == "auto" and not blockers and trainer.accelerator.device.type == "cuda":
        # benchmarks/lm_head.py on an H100 (bf16): 1.7-2.5x slower than TRL's fused Triton head at rho 0.2
        blockers.append("on CUDA, TRL's fused Triton head is faster")
    return blockers


def text_only_loss_forward(rows: int, kwargs: dict) -> bool:
    """A loss forward the sparse head covers: no images, no TRL aux loss, the whole micro-batch at once."""
    batch_size = kwargs.get("batch_size")
    return (
        all(kwargs.get(key) is None for key in MULTIMODAL_KEYS)
        and not kwargs.get("compute_aux_loss")
        and (batch_size is None or batch_size >= rows)
    )
