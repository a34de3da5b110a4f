"""What training writes about its forking tokens and routing, one record per logging step.

* ``forking_tokens.jsonl``: a few completions with their forking tokens marked « », the most frequent
  forking tokens, and a histogram of every completion token's entropy;
* ``routing.jsonl``: per-layer expert loads on forking vs other tokens (MoE policies).

Rank 0 keeps the record between logging steps; the trainer feeds it the gathered selection.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

# Completion-token entropy histogram: 8 log-spaced bins per decade over [1e-6, 10] nats; values outside
# are counted in the first/last bin.
ENTROPY_BIN_EDGES = torch.logspace(-6, 1, 57, dtype=torch.float64)


class ForkingTokenLog:
    def __init__(self, num_examples: int):
        self.num_examples = num_examples
        self._examples: list[dict] = []
        self._token_counts: Counter[int] = Counter()
        self._histogram = torch.zeros(len(ENTROPY_BIN_EDGES) - 1, dtype=torch.int64)

    def add(
        self,
        entropies: torch.Tensor,
        mask: torch.Tensor,
        completion_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Count one training micro-batch.

        Args:
            entropies, mask: (B_all, T) every rank's completion entropies and real tokens (the histogram).
            completion_ids, loss_mask, keep: (B, T) this rank's tokens, loss mask and forking tokens.
        """
        values = entropies.detach()[mask.bool()].to("cpu", torch.float64)
        bins = torch.bucketize(values, ENTROPY_BIN_EDGES[1:-1])
        self._histogram += torch.bincount(bins, minlength=len(self._histogram))
        self._token_counts.update(completion_ids[keep].tolist())
        for row in range(min(completion_ids.size(0), self.num_examples - len(self._examples))):
            real = loss_mask[row].bool()
            self._examples.append(
                {"token_ids": completion_ids[row][real].tolist(), "forking": keep[row][real].tolist()}
            )

    def write(self, output_dir: str, step: int, tokenizer, expert_loads: dict | None) -> None:
        """Append this logging step's records and start a new one."""
        examples, counts, histogram = self._examples, self._token_counts, self._histogram
        self._examples, self._token_counts = [], Counter()
        self._histogram = torch.zeros_like(histogram)
        os.makedirs(output_dir, exist_ok=True)
        if expert_loads:  # per-layer expert loads on forking vs other tokens, for the report's heatmaps
            with open(os.path.join(output_dir, "routing.jsonl"), "a") as handle:
                handle.write(json.dumps({"step": step, "expert_load": expert_loads}) + "\n")
        if not (examples or counts):
            return
        record = {
            "step": step,
            "examples": [marked_completion(tokenizer, example) for example in examples],
            "top_forking_tokens": [[tokenizer.decode([token]), count] for token, count in counts.most_common(20)],
            "entropy_histogram": {"edges": ENTROPY_BIN_EDGES.tolist(), "counts": histogram.tolist()},
        }
        with open(os.path.join(output_dir, "forking_tokens.jsonl"), "a") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def marked_completion(tokenizer, example: dict) -> str:
    """The completion with each forking token wrapped in « »."""
    pieces = []
    for token_id, is_forking in zip(example["token_ids"], example["forking"], strict=True):
        text = tokenizer.decode([token_id])
        pieces.append(f"«{text}»" if is_forking else text)
    return "".join(pieces)
