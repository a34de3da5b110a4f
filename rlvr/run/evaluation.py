"""Accuracy of a policy on held-out problems: greedy pass@1, sampled accuracy and pass@k.

Greedy accuracy on a few hundred problems has a standard error of several points, so the sampled
accuracy (mean reward over ``num_samples`` completions per problem at temperature 1) is reported as
well, and pass@k with the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models
Trained on Code", eq. 1): ``1 - C(n - c, k) / C(n, k)`` averaged over problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.models import gathered_whole
from rlvr.models.parallel import gathered_for_generation
from rlvr.utils.options import option, require


@dataclass
class EvalConfig:
    """The ``eval`` config section: held-out accuracy before, during and after RL."""

    enabled: bool = option(True, "evaluate before and after training")
    sampled_completions: int = option(4, "completions per problem for sampled accuracy (0: greedy only)")
    temperature: float = option(1.0, "sampling temperature for sampled accuracy")
    batch_size: int = option(64, "prompts per generation batch")
    max_new_tokens: int | None = option(None, "generation limit (default: grpo.max_completion_length)")
    every: int = option(0, "also evaluate every N training steps (0: only before and after)")
    pass_k: int = option(0, "report pass@k from the sampled completions (0: off; needs k <= sampled_completions)")

    def validate(self) -> None:
        require(self.sampled_completions >= 0, "sampled_completions", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.every >= 0, "every", "must be >= 0")
        require(
            0 <= self.pass_k <= self.sampled_completions,
            "pass_k",
            f"must be between 0 and eval.sampled_completions ({self.sampled_completions})",
        )


@dataclass
class EvalResult:
    greedy_accuracy: float
    sampled_accuracy: float  # NaN when num_samples == 0
    num_problems: int
    num_samples: int
    mean_completion_tokens: float
    pass_at_k: float = math.nan  # NaN without sampled completions
    k: int = 0
    # per group of problems (the embedded task's domains):
    # {group: {"greedy_accuracy", "sampled_accuracy", "num_problems"}}
    by_group: dict = field(default_factory=dict)
    greedy_correct: list = field(default_factory=list)  # (problems,) 1 if the greedy completion was right
    sampled_correct: list = field(default_factory=list)  # (problems,) share of right sampled completions

    @property
    def greedy_stderr(self) -> float:
        p, n = self.greedy_accuracy, max(self.num_problems, 1)
        return math.sqrt(p * (1 - p) / n)

    def as_dict(self) -> dict:
        return asdict(self) | {"greedy_stderr": self.greedy_stderr}


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence) -> list[str]:
    """Prompts as text: chat messages go through the chat template, strings pass through."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(prompt)
        else:
            rendered.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
    return rendered


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``num_correct`` correct out of ``num_samples`` (Chen et al., 2021)."""
    if not 0 < k <= num_samples:
        raise ValueError(f"need 0 < k <= num_samples, got k={k}, num_samples={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@contextmanager
def router_logits_off(model: PreTrainedModel):
    """Generate with ``output_router_logits=False``: with it on, ``generate()`` computes the MoE aux loss
    at every decoding step against the full attention mask and crashes on left-padded prompts."""
    config = model.config.get_text_config()
    previous = getattr(config, "output_router_logits", None)
    if previous:
        config.output_router_logits = False
    try:
        yield
    finally:
        if previous:
            config.output_router_logits = previous


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    progress: str | None = None,
) -> tuple[list[str], list[int]]:
    """Completions (special tokens removed) and their token counts, ``num_return_sequences`` per prompt."""
    texts = render_prompts(tokenizer, prompts)
    completions, lengths = [], []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = range(0, len(texts), batch_size)
    # ZeRO-3: every parameter gathered for the whole evaluation; FSDP2 (expert parallelism): the dense weights
    # gathered once per generate call, not once per decoded token
    with router_logits_off(model), gathered_whole(model), gathered_for_generation(model):
        for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            batch_texts = texts[start : start + batch_size]
            batch_completions, batch_lengths = _generate_batch(
                model, tokenizer, batch_texts, device, max_new_tokens, do_sample, temperature, num_return_sequences
            )
            completions += batch_completions
            lengths += batch_lengths
    model.train(was_training)
    return completions, lengths


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    device: torch.device,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    num_return_sequences: int,
) -> tuple[list[str], list[int]]:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, encoded["input_ids"].shape[1] :]  # (B * num_return_sequences, C)
    completions, lengths = [], []
    for row in new_tokens:
        real = row[row != tokenizer.pad_token_id]
        lengths.append(int(real.numel()))
        completions.append(tokenizer.decode(real, skip_special_tokens=True))
    return completions, lengths


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    answers: Sequence[str],
    reward_fn: Callable[..., list],
    max_new_tokens: int,
    batch_size: int = 64,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
    k: int = 0,
    groups: Sequence[str] | None = None,
) -> EvalResult:
    """Greedy accuracy, plus sampled accuracy over ``num_samples`` completions per problem.

    A completion counts as correct when ``reward_fn`` gives it a reward of at least 1. With ``groups``
    (one label per problem, e.g. its domain), accuracies are also reported per group.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(groups)} group labels")
    if not prompts:
        return EvalResult(math.nan, math.nan, 0, num_samples, math.nan)
    greedy, lengths = generate_completions(
        model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress and f"{progress} (greedy)"
    )
    greedy_rewards = reward_fn(completions=greedy, answer=list(answers))
    sampled_accuracy, result_pass_at_k = math.nan, math.nan
    greedy_correct = [r >= 1.0 for r in greedy_rewards]  # (problems,)
    sampled_correct: list[float] | None = None  # (problems,) share of correct samples
    if num_samples > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sampled, _ = generate_completions(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                max(1, batch_size // num_samples),
                do_sample=True,
                temperature=temperature,
                num_return_sequences=num_samples,
                progress=progress and f"{progress} (sampled)",
            )
        repeated_answers = [a for a in answers for _ in range(num_samples)]
        sampled_rewards = reward_fn(completions=sampled, answer=repeated_answers)
        sampled_accuracy = sum(r >= 1.0 for r in sampled_rewards) / len(sampled_rewards)
        sampled_correct = [
            sum(r >= 1.0 for r in sampled_rewards[i * num_samples : (i + 1) * num_samples]) / num_samples
            for i in range(len(prompts))
        ]
        if 0 < k <= num_samples:
            correct = [
                sum(r >= 1.0 for r in sampled_rewards[i * num_samples : (i + 1) * num_samples])
                for i in range(len(prompts))
            ]
            result_pass_at_k = sum(pass_at_k(num_samples, c, k) for c in correct) / len(correct)
    by_group = {}
    for group in dict.fromkeys(groups or []):
        members = [i for i, label in enumerate(groups) if label == group]
        by_group[group] = {
            "greedy_accuracy": sum(greedy_correct[i] for i in members) / len(members),
            "sampled_accuracy": sum(sampled_correct[i] for i in members) / len(members)
            if sampled_correct
            else math.nan,
            "num_problems": len(members),
        }
    return EvalResult(
        greedy_accuracy=sum(greedy_correct) / len(greedy_correct),
        by_group=by_group,
        sampled_accuracy=sampled_accuracy,
        num_problems=len(prompts),
        num_samples=num_samples,
        mean_completion_tokens=sum(lengths) / len(lengths),
        pass_at_k=result_pass_at_k,
        k=k if num_samples >= k > 0 else 0,
        greedy_correct=[int(correct) for correct in greedy_correct],
        sampled_correct=list(sampled_correct or []),
    )
