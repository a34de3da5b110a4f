"""Routed experts from an inference engine, in every documented vLLM layout, as rlvr's replay record."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from rlvr.moe.replay import NOT_RECORDED
from rlvr.rollouts.engine_routing import EngineRouting, EngineRoutingError, engine_routing_record

EXPERTS, TOP_K, LAYERS = 8, 2, 3


def _routes(tokens: int, seed: int, layers: int = LAYERS) -> np.ndarray:
    """(tokens, layers, k) distinct experts per top-k."""
    generator = np.random.default_rng(seed)
    if tokens == 0:
        return np.zeros((0, layers, TOP_K), dtype=np.int32)
    return np.stack(
        [np.stack([generator.choice(EXPERTS, TOP_K, replace=False) for _ in range(layers)]) for _ in range(tokens)]
    ).astype(np.int32)


def _npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


PROMPTS, COMPLETIONS = [3, 5], [4, 1]  # a one-token completion has no completion rows
P, C = 6, 5


def _truth():
    return [
        (_routes(p, 10 + row), _routes(max(c - 1, 0), 20 + row))
        for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
    ]


def _record(routings, **kwargs):
    settings = dict(prompt_width=P, completion_width=C, num_experts=EXPERTS, top_k=TOP_K, moe_layers=[0, 1, 2])
    return engine_routing_record(routings, PROMPTS, COMPLETIONS, **(settings | kwargs))


def _expected(truth) -> torch.Tensor:
    out = torch.full((2, P + C, LAYERS, TOP_K), NOT_RECORDED, dtype=torch.int16)
    for row, (prompt, completion) in enumerate(truth):
        out[row, P - len(prompt) : P] = torch.from_numpy(prompt)
        out[row, P : P + len(completion)] = torch.from_numpy(completion)
    return out


LAYOUTS = {
    "0.14-0.20 one array": lambda p, c: EngineRouting(np.concatenate([p, c])),
    "0.21 split int16": lambda p, c: EngineRouting(c.astype(np.int16), p.astype(np.int16)),
    "0.22 http npy": lambda p, c: EngineRouting(_npy_base64(c.astype(np.int16)), _npy_base64(p.astype(np.int16))),
    "http dict": lambda p, c: EngineRouting(
        {
            "encoding": "base64",
            "dtype": "int16",
            "shape": list(c.shape),
            "data": base64.b64encode(c.astype(np.int16).tobytes()).decode(),
        },
        {
            "encoding": "base64",
            "dtype": "int16",
            "shape": list(p.shape),
            "data": base64.b64encode(p.astype(np.int16).tobytes()).decode(),
        },
    ),
    "nested lists": lambda p, c: EngineRouting(np.concatenate([p, c]).tolist()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_record(layout):
    truth = _truth()
    record = _record([LAYOUTS[layout](p, c) for p, c in truth])
    assert record.dtype == torch.int16 and record.shape == (2, P + C, LAYERS, TOP_K)
    assert torch.equal(record, _expected(truth))
    # padding, the last completion token and positions past the completion keep live routing
    assert (record[0, : P - PROMPTS[0]] == NOT_RECORDED).all() and (
        record[0, P + COMPLETIONS[0] - 1 :] == NOT_RECORDED
    ).all()


def test_completion_only_keeps_the_prompt_live_and_all_decoder_layers_are_narrowed_to_moe_layers():
    truth = _truth()
    record = _record([EngineRouting(c) for _, c in truth])
    assert (record[:, :P] == NOT_RECORDED).all()
    assert torch.equal(record[:, P:], _expected(truth)[:, P:])
    # an engine returning all 5 decoder layers of a model whose MoE layers are 1, 3, 4 (dense layers 0 and 2)
    wide = [
        (_routes(p, 30 + i, layers=5), _routes(max(c - 1, 0), 40 + i, layers=5))
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
    ]
    record = _record([EngineRouting(np.concatenate([p, c])) for p, c in wide], moe_layers=[1, 3, 4])
    assert torch.equal(record, _expected([(p[:, [1, 3, 4]], c[:, [1, 3, 4]]) for p, c in wide]))


def _one_bad(mutate):
    truth = _truth()
    routings = [EngineRouting(np.concatenate([p, c])) for p, c in truth]
    routings[0] = mutate(truth[0][0].copy(), truth[0][1].copy())
    return routings


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p, c: EngineRouting(np.concatenate([p, c]) + EXPERTS), "out of range"),
        (lambda p, c: EngineRouting(-np.ones_like(np.concatenate([p, c]))), "out of range"),
        (lambda p, c: EngineRouting(np.zeros_like(np.concatenate([p, c]))), "repeats an expert"),
        (lambda p, c: EngineRouting(np.concatenate([p, c, c])), "fit no layout"),
        (lambda p, c: EngineRouting(c, p[1:]), "prompt rows"),
        (lambda p, c: EngineRouting(np.concatenate([c, c[:1]]), p), "completion rows"),
        (lambda p, c: EngineRouting(np.concatenate([p, c])[:, :2]), "layers"),
        (lambda p, c: EngineRouting(np.concatenate([p, c])[:, :, :1]), "top-1 routing"),
        (lambda p, c: EngineRouting("not base64!"), "base64"),
        (lambda p, c: EngineRouting(np.concatenate([p, c]).astype(np.float32)), "integer"),
        (lambda p, c: EngineRouting({"encoding": "zstd", "data": "", "shape": [1]}), "encoding=base64"),
    ],
)
def test_malformed_routing_fails_naming_the_row(mutate, message):
    with pytest.raises(EngineRoutingError, match=message) as error:
        _record(_one_bad(mutate))
    assert "row 0" in str(error.value)


def test_batch_sizes_must_agree():
    with pytest.raises(EngineRoutingError, match="entries for 2 prompts"):
        _record([EngineRouting(np.zeros((0, LAYERS, TOP_K), dtype=np.int32))])
