"""Routed experts returned by an inference engine, laid out as rlvr's routing-replay record.

vLLM started with ``enable_return_routed_experts=True`` (``LLM(...)`` / engine argument;
``--enable-return-routed-experts`` for ``vllm serve``) returns the experts its routers chose for every
token it ran through the model. The layout changed across versions:

* 0.14-0.20: ``CompletionOutput.routed_experts``, an int32 array ``[P + C - 1, num_layers, k]``: the
  prompt's tokens, then every completion token but the last (never fed back into the model);
* 0.21: ``RequestOutput.prompt_routed_experts`` ``[P, num_layers, k]`` plus per completion
  ``routed_experts`` ``[C - 1, num_layers, k]``, int16;
* 0.22+: also over HTTP, ``choices[].routed_experts`` (and ``prompt_routed_experts`` on the response)
  as base64 of an ``.npy`` file, or as ``{"encoding": "base64", "dtype", "shape", "data"}``.

:func:`engine_routing_record` turns any of them into the record that routing replay forces in the
training forwards, (B, P + C, layers, k) int16 (:mod:`rlvr.moe.replay`): the prompt right-aligned in
the left-padded batch, the MoE layers in rlvr's order, :data:`NOT_RECORDED` (live routing) wherever the
engine returned nothing. What is malformed fails with one error naming the row: an expert id out of
range, one expert twice in one top-k (the all-zero rows an engine writes when capture silently failed),
a length that fits no layout, a wrong layer count or top-k.

The engine call sites (vLLM) are not exercised here; this function is, on arrays in every layout.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
import torch

from rlvr.moe.replay import NOT_RECORDED, compact_dtype


class EngineRoutingError(ValueError):
    """Routed experts from the engine that cannot be replayed."""


@dataclass
class EngineRouting:
    """What the engine returned for one completion. ``routed_experts``: the completion's array (or, in the
    0.14-0.20 layout, prompt and completion together); ``prompt_routed_experts``: the prompt's array where
    the engine returns it separately (0.21+). Each: an array, nested lists, or the HTTP encodings."""

    routed_experts: object
    prompt_routed_experts: object = None


def decode_routed_experts(raw: object, where: str) -> np.ndarray:
    """One routed-experts payload as a ``[tokens, layers, k]`` int64 array."""
    if isinstance(raw, dict):  # {"encoding": "base64", "dtype": ..., "shape": [...], "data": ...}
        if raw.get("encoding") != "base64" or "data" not in raw or "shape" not in raw:
            raise EngineRoutingError(f"{where}: a dict payload needs encoding=base64, dtype, shape and data")
        try:
            flat = np.frombuffer(
                base64.b64decode(raw["data"], validate=True), dtype=np.dtype(raw.get("dtype", "int16"))
            )
            array = flat.reshape(tuple(raw["shape"]))
        except (binascii.Error, TypeError, ValueError) as error:
            raise EngineRoutingError(f"{where}: undecodable payload ({error})") from None
    elif isinstance(raw, (str, bytes)):  # base64 of an .npy file
        try:
            payload = base64.b64decode(raw, validate=True)
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as error:
            raise EngineRoutingError(f"{where}: not a base64-encoded .npy array ({error})") from None
    else:
        array = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if array.size == 0:
        return np.zeros((0, 0, 0), dtype=np.int64)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise EngineRoutingError(f"{where}: expected an integer [tokens, layers, k] array, got shape {array.shape}")
    return array.astype(np.int64)


def _rows(
    routing: EngineRouting, prompt_length: int, completion_length: int, where: str
) -> tuple[np.ndarray | None, np.ndarray]:
    """The (prompt rows or None, completion rows) of one completion, whichever layout it came in.
    Completion rows cover positions ``0 .. C - 2`` (the last token never ran)."""
    steps = max(completion_length - 1, 0)
    rows = decode_routed_experts(routing.routed_experts, where)
    if routing.prompt_routed_experts is not None:  # 0.21+: split
        prompt = decode_routed_experts(routing.prompt_routed_experts, f"{where} (prompt)")
        if prompt.shape[0] != prompt_length:
            raise EngineRoutingError(f"{where}: {prompt.shape[0]} prompt rows for a {prompt_length}-token prompt")
        if rows.shape[0] != steps:
            raise EngineRoutingError(
                f"{where}: {rows.shape[0]} completion rows for a {completion_length}-token completion "
                f"(expected {steps}: the last token never runs)"
            )
        return prompt, rows
    if rows.shape[0] == prompt_length + steps:  # 0.14-0.20: prompt and completion in one array
        return rows[:prompt_length], rows[prompt_length:]
    if rows.shape[0] == steps:  # completion only: the prompt keeps its live routing
        return None, rows
    raise EngineRoutingError(
        f"{where}: {rows.shape[0]} routed rows fit no layout for a {prompt_length}-token prompt and a "
        f"{completion_length}-token completion (expected {prompt_length + steps} or {steps}, or a separate "
        "prompt array)"
    )


def _select_layers(rows: np.ndarray, moe_layers: list[int], where: str) -> np.ndarray:
    """``rows`` over rlvr's MoE layers: as they are when the engine returned one entry per MoE layer,
    else the entries of the decoder layers ``moe_layers`` (engines that return every decoder layer)."""
    if rows.shape[1] == len(moe_layers):
        return rows
    if rows.shape[1] > max(moe_layers):
        return rows[:, moe_layers]
    raise EngineRoutingError(
        f"{where}: {rows.shape[1]} layers; the policy has {len(moe_layers)} MoE layers (decoder layers {moe_layers})"
    )


def _check(rows: np.ndarray, num_experts: int, top_k: int, where: str) -> None:
    if rows.shape[0] == 0:
        return
    if rows.shape[2] != top_k:
        raise EngineRoutingError(f"{where}: top-{rows.shape[2]} routing for a top-{top_k} policy")
    bad = (rows < 0) | (rows >= num_experts)
    if bad.any():
        token, layer, _ = np.argwhere(bad)[0]
        raise EngineRoutingError(
            f"{where}: expert id {rows[token, layer][bad[token, layer]][0]} out of range [0, {num_experts}) "
            f"at token {token}, layer {layer}"
        )
    ordered = np.sort(rows, axis=-1)
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(axis=-1)  # (tokens, layers)
    if repeated.any():
        token, layer = np.argwhere(repeated)[0]
        raise EngineRoutingError(
            f"{where}: expert {ordered[token, layer].tolist()} repeats an expert in one top-{top_k} at token "
            f"{token}, layer {layer} (an engine whose capture failed writes zeros)"
        )


def engine_routing_record(
    routings: list[EngineRouting],
    prompt_lengths: list[int],
    completion_lengths: list[int],
    prompt_width: int,
    completion_width: int,
    num_experts: int,
    top_k: int,
    moe_layers: list[int],
) -> torch.Tensor:
    """The replay record of a batch whose completions an engine sampled.

    Args:
        routings: per row, what the engine returned.
        prompt_lengths, completion_lengths: per row, tokens of the prompt (unpadded) and the completion.
        prompt_width, completion_width: P and C of the training batch (prompts left-padded to P).
        num_experts, top_k: the policy's router.
        moe_layers: the decoder-layer index of each of the policy's MoE layers, in rlvr's order.

    Returns:
        (B, P + C, layers, k) int16 (int32 beyond 32767 experts); :data:`NOT_RECORDED` where the engine
        returned nothing (padding, the last completion token, a prompt it did not return).
    """
    if not len(routings) == len(prompt_lengths) == len(completion_lengths):
        raise EngineRoutingError(
            f"{len(routings)} routed-experts entries for {len(prompt_lengths)} prompts and "
            f"{len(completion_lengths)} completions"
        )
    record = np.full(
        (len(routings), prompt_width + completion_width, len(moe_layers), top_k), NOT_RECORDED, dtype=np.int64
    )
    for row, (routing, prompt_length, completion_length) in enumerate(
        zip(routings, prompt_lengths, completion_lengths, strict=True)
    ):
        where = f"routed_experts of row {row}"
        if prompt_length > prompt_width or completion_length > completion_width:
            raise EngineRoutingError(f"{where}: longer than the batch ({prompt_width} + {completion_width} tokens)")
        prompt, completion = _rows(routing, prompt_length, completion_length, where)
        if prompt is not None and prompt.shape[0]:
            prompt = _select_layers(prompt, moe_layers, where)
            _check(prompt, num_experts, top_k, where)
            record[row, prompt_width - prompt_length : prompt_width] = prompt
        if completion.shape[0]:
            completion = _select_layers(completion, moe_layers, where)
            _check(completion, num_experts, top_k, where)
            record[row, prompt_width : prompt_width + completion.shape[0]] = completion
    return torch.from_numpy(record).to(compact_dtype(num_experts))


def decoder_layer_indices(module_names: list[str]) -> list[int]:
    """The decoder-layer index of each MoE block from its module path (``model.layers.3.mlp`` -> 3): where
    an engine that returns every decoder layer's routing keeps each of rlvr's MoE layers. A path without a
    ``layers.<i>`` part keeps its position in the list."""
    indices = []
    for position, name in enumerate(module_names):
        match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        indices.append(int(match.group(1)) if match else position)
    return indices
