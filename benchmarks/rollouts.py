"""Generation cost per step: forking-tree rollouts vs i.i.d. sampling, same model, same G, same prompts.

One step = the completions of one generation batch (``--prompts`` prompts x G). i.i.d. is TRL's
transformers path: one ``generate`` call over the left-padded batch. The tree is
:class:`rlvr.rollouts.tree.ForkingTreeSampler`: M = G / (1 + N) roots per prompt, then N branches per
root in one more ``generate`` call that continues from the roots' KV cache. Both are timed interleaved
in one process (rotating order), so machine noise hits all alike; the tree also runs without KV-cache
reuse (``rollout.reuse_cache=false``: each branch re-reads its prefix), which shows what the reuse buys.
Printed per model: median generation seconds per step, tokens decoded per step (a shared prefix once),
and the ratios to i.i.d.

Two models:

* ``quickstart``: the quickstart's warm-started tiny MoE on its own prompts (completions end at EOS,
  as in training; the warm start is cached, built on first use);
* ``long``: a wider random-init tiny MoE with EOS suppressed, so every root runs ``--long-length``
  tokens (512 by default): where KV-cache reuse of the shared prefix matters. A random-init model's
  entropy is highest on its first tokens, so it branches early; ``--long-min-prefix`` moves the branches
  into the root's second half, the long shared prefixes of a trained model that decides late.

    python benchmarks/rollouts.py                          # both models
    python benchmarks/rollouts.py --models long --long-min-prefix 256
    python benchmarks/rollouts.py --models long --rounds 3 --long-length 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import quiet
from transformers import GenerationConfig

from rlvr.data import ArithmeticTask, generate_problems, make_prompt
from rlvr.models import TinyMoESpec, load_pretrained, save_tiny_policy
from rlvr.rollouts.config import RolloutConfig
from rlvr.rollouts.tree import ForkingTreeSampler, completion_lengths, left_pad


def quickstart_model():
    """The quickstart's policy after its (cached) warm start, and its training prompts' token ids."""
    from rlvr.run.config import load_config
    from rlvr.run.recipe import prepare_data, prepare_policy, resolve_rewards
    from rlvr.utils.packaged import QUICKSTART

    config = load_config(QUICKSTART)
    data = prepare_data(config)
    _, _, accuracy = resolve_rewards(config)
    model, tokenizer, _ = prepare_policy(config, data, accuracy)
    return model, tokenizer, list(data.train["prompt"]), config.max_completion_length()


def long_model(directory: str, hidden: int):
    spec = TinyMoESpec(num_layers=4, hidden_size=hidden, expert_size=2 * hidden, num_heads=4, num_kv_heads=2)
    model, tokenizer = load_pretrained(str(save_tiny_policy("qwen3_moe", spec, directory, seed=0)))
    problems = generate_problems(ArithmeticTask(), "train", 64, seed=0)
    return model, tokenizer, [make_prompt(p.question, None, chat=False) for p in problems]


def prompt_ids(tokenizer, prompts: list, count: int, group_size: int) -> list[list[int]]:
    rows = []
    for prompt in prompts[:count]:
        if isinstance(prompt, list):  # chat messages
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt)["input_ids"]
        rows += [list(ids)] * group_size
    return rows


def iid_step(model, rows: list[list[int]], config: GenerationConfig, eos: list[int], pad: int) -> tuple[float, int]:
    """TRL's transformers path: one generate over the left-padded batch. Returns (seconds, decoded tokens)."""
    input_ids, mask = left_pad(rows, pad)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    seconds = time.perf_counter() - start
    return seconds, int(completion_lengths(output[:, input_ids.shape[1] :], eos).sum())


def tree_step(sampler, model, rows, group_size, config) -> tuple[float, int]:
    start = time.perf_counter()
    rollout = sampler.sample(model, rows, group_size, config)
    return time.perf_counter() - start, rollout.stats.decoded_tokens


def measure(name, model, tokenizer, prompts, args, length: int, suppress_eos: bool, min_prefix: int = 2) -> None:
    model.eval()
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        max_new_tokens=length,
        min_new_tokens=length if suppress_eos else 0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    samplers = {
        "tree": ForkingTreeSampler(
            RolloutConfig(mode="forking_tree", branches=args.branches, min_prefix=min_prefix), eos, pad
        ),
        "tree, no reuse": ForkingTreeSampler(
            RolloutConfig(mode="forking_tree", branches=args.branches, min_prefix=min_prefix, reuse_cache=False),
            eos,
            pad,
        ),
    }
    rows = prompt_ids(tokenizer, prompts, args.prompts, args.generations)
    labels = ["iid", *samplers]
    results = {label: ([], []) for label in labels}
    torch.manual_seed(0)
    iid_step(model, rows[: args.generations], config, eos, pad)  # warm-up (allocator, kernels)
    for round_index in range(args.rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            seconds, tokens = (
                iid_step(model, rows, config, eos, pad)
                if label == "iid"
                else tree_step(samplers[label], model, rows, args.generations, config)
            )
            results[label][0].append(seconds)
            results[label][1].append(tokens)
    seconds = {label: statistics.median(results[label][0]) for label in labels}
    tokens = {label: statistics.median(results[label][1]) for label in labels}
    print(
        f"\n{name}: {args.prompts} prompts x G={args.generations}, branches={args.branches}, max {length} tokens"
        f"{' (EOS suppressed)' if suppress_eos else ''}, min_prefix={min_prefix}, median of {args.rounds} steps"
    )
    print(f"{'':16}{'generation s / step':>22}{'ratio':>8}{'decoded tokens / step':>24}{'ratio':>8}")
    for label in labels:
        print(
            f"{label:16}{seconds[label]:22.3f}{seconds[label] / seconds['iid']:8.3f}"
            f"{tokens[label]:24.0f}{tokens[label] / tokens['iid']:8.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="quickstart,long", help="comma-separated: quickstart, long")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--branches", type=int, default=3, help="N, branches per root (M = G / (1 + N) roots)")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per mode (interleaved)")
    parser.add_argument("--long-length", type=int, default=512, help="completion tokens of the long model")
    parser.add_argument("--long-hidden", type=int, default=256, help="hidden size of the long model")
    parser.add_argument("--long-min-prefix", type=int, default=2, help="rollout.min_prefix for the long model")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    for name in args.models.split(","):
        if name == "quickstart":
            model, tokenizer, prompts, length = quickstart_model()
            measure("quickstart model", model, tokenizer, prompts, args, length, suppress_eos=False)
        elif name == "long":
            with tempfile.TemporaryDirectory() as scratch:
                model, tokenizer, prompts = long_model(f"{scratch}/model", args.long_hidden)
                measure(
                    "long model",
                    model,
                    tokenizer,
                    prompts,
                    args,
                    args.long_length,
                    suppress_eos=True,
                    min_prefix=args.long_min_prefix,
                )
        else:
            parser.error(f"--models: unknown model {name!r} (quickstart, long)")


if __name__ == "__main__":
    main()
