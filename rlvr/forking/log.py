"""What training writes about its forking tokens and routing, one record per logging step.

* ``forking_tokens.jsonl``: a few completions with their forking tokens marked « », the most frequent
  forking tokens, and a histogram of every completion token's entropy;
* ``routing.jsonl``: per-layer expert loads on forking vs other tokens (MoE policies).

Rank 0 keeps the record between logging steps; the trainer feeds it the gathered selection.
"""

from __future__ import annotations

import json
import os

import torch

# Completion-token entropy histogram: 8 log-spaced bins per decade over [1e-6, 10] nats; values outside
# are counted in the first/last bin.
ENTROPY_BIN_EDGES = torch.logspace(-6, 1, 57, dtype=torch.float64)


class ForkingTokenLog:
    """The record of one logging step, kept on the device: :meth:`add` (every micro-step) reads nothing to
    the host; :meth:`write` (every logging step) reads it all once."""

    def __init__(self, num_examples: int, vocab_size: int):
        self.num_examples = num_examples
        self.vocab_size = vocab_size
        self._examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (T,) ids, loss mask, forking
        self._token_counts: torch.Tensor | None = None  # (V,) int64: how often each token id was a forking token
        self._histogram: torch.Tensor | None = None  # (bins,) int64
        self._edges: torch.Tensor | None = None  # the inner bin edges, on the device of the entropies

    def add(
        self,
        entropies: torch.Tensor,
        mask: torch.Tensor,
        completion_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Count one training micro-batch (on its device; no host read).

        Args:
            entropies, mask: (B_all, T) every rank's completion entropies and real tokens (the histogram).
            completion_ids, loss_mask, keep: (B, T) this rank's tokens, loss mask and forking tokens.
        """
        device = entropies.device
        if self._histogram is None:
            self._edges = ENTROPY_BIN_EDGES[1:-1].to(device)
            self._histogram = torch.zeros(len(ENTROPY_BIN_EDGES) - 1, dtype=torch.int64, device=device)
            self._token_counts = torch.zeros(self.vocab_size, dtype=torch.int64, device=device)
        bins = torch.bucketize(entropies.detach().to(self._edges.dtype), self._edges)  # (B_all, T) in [0, bins)
        self._histogram.scatter_add_(0, bins.reshape(-1), mask.reshape(-1).to(torch.int64))
        forking = (keep.bool() & loss_mask.bool()).reshape(-1).to(torch.int64)
        self._token_counts.scatter_add_(0, completion_ids.reshape(-1).to(self._token_counts.device), forking)
        for row in range(min(completion_ids.size(0), self.num_examples - len(self._examples))):
            self._examples.append((completion_ids[row].clone(), loss_mask[row].bool(), keep[row].bool()))

    def write(self, output_dir: str, step: int, tokenizer, expert_loads: dict | None) -> None:
        """Append this logging step's records and start a new one."""
        examples, counts, histogram = self._examples, self._token_counts, self._histogram
        self._examples, self._token_counts, self._histogram = [], None, None
        os.makedirs(output_dir, exist_ok=True)
        if expert_loads:  # per-layer expert loads on forking vs other tokens, for the report's heatmaps
            with open(os.path.join(output_dir, "routing.jsonl"), "a") as handle:
                handle.write(json.dumps({"step": step, "expert_load": expert_loads}) + "\n")
        if histogram is None:
            return
        top = torch.topk(counts, min(20, counts.numel()))
        counted = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        top_forking = [[token, count] for count, token in counted if count]
        record = {
            "step": step,
            "examples": [marked_completion(tokenizer, _host_example(*example)) for example in examples],
            "top_forking_tokens": [[tokenizer.decode([token]), count] for token, count in top_forking],
            "entropy_histogram": {"edges": ENTROPY_BIN_EDGES.tolist(), "counts": histogram.tolist()},
        }
        with open(os.path.join(output_dir, "forking_tokens.jsonl"), "a") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _host_example(token_ids: torch.Tensor, loss_mask: torch.Tensor, forking: torch.Tensor) -> dict:
    """One kept completion row as lists of its loss-mask tokens (read at logging time)."""
    token_ids, loss_mask, forking = token_ids.tolist(), loss_mask.tolist(), forking.tolist()
    real = [index for index, in_loss in enumerate(loss_mask) if in_loss]
    return {"token_ids": [token_ids[i] for i in real], "forking": [forking[i] for i in real]}


def marked_completion(tokenizer, example: dict) -> str:
    """The completion with each forking token wrapped in « »."""
    pieces = []
    for token_id, is_forking in zip(example["token_ids"], example["forking"], strict=True):
        text = tokenizer.decode([token_id])
        pieces.append(f"«{text}»" if is_forking else text)
    return "".join(pieces)
