"""How much training-inference mismatch a copy engine makes: router flips and log-prob KL per noise level.

    python scripts/calibrate_router_noise.py --checkpoint PATH --dtype bfloat16 --noise 0 0.1 0.2 0.4

Samples completions of the task's training prompts with ``rlvr.rollouts.copy_engine.CopyEngine`` at each
``rollout.router_noise`` and scores them with the policy itself in float32 (teacher-forced, live
routing), as the trainer's old-policy forward does. Prints, per level, the share of (token, layer) routing
decisions that differ (``mismatch/router_flips``; about 10% on Qwen3-30B-A3B under vLLM, arXiv 2510.11370),
the share of tokens with a flip, and the per-token k3 KL. Pick the level that reaches the mismatch to
study and set it as ``rollout.router_noise``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GenerationConfig

from rlvr.data.arithmetic import ArithmeticTask, generate_problems
from rlvr.data.records import problems_to_dataset
from rlvr.models import load_pretrained
from rlvr.rollouts.copy_engine import CopyEngine, teacher_forced
from rlvr.rollouts.mismatch import logprob_mismatch, routing_flips


def measure(model, tokenizer, prompts, dtype, noise: float, temperature: float, max_tokens: int, seed: int):
    engine = CopyEngine(model, dtype, router_noise=noise, seed=seed)
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    out = engine.generate(prompts, config, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    view = teacher_forced(model, prompts, out.completion_ids, tokenizer.pad_token_id, temperature)
    training, trainer_routing, P = view.logprobs, view.experts, view.prompt_width
    sampling = torch.zeros_like(training)
    for row, values in enumerate(out.logprobs):
        sampling[row, : len(values)] = torch.tensor(values, dtype=training.dtype)
    record = engine.replay_record(out, prompts, P, training.shape[1])
    engine.remove()
    positions = torch.zeros(record.shape[:2], dtype=torch.long)
    positions[:, P:] = view.completion_mask
    return logprob_mismatch(sampling, training, view.completion_mask) | routing_flips(
        record, trainer_routing, positions
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the policy (a from_pretrained directory)")
    parser.add_argument("--dtype", default="bfloat16", help="the engine's precision (the policy scores in float32)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4], help="levels to try")
    parser.add_argument("--prompts", type=int, default=128, help="training prompts sampled once each")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_pretrained(args.checkpoint, "float32")
    model.eval()
    task = ArithmeticTask(min_terms=2, max_terms=3, max_operand=9, eval_fraction=0.2)  # the quickstart's task
    rows = problems_to_dataset(generate_problems(task, "train", args.prompts, seed=args.seed))
    prompts = [
        list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
        for row in rows
    ]
    print(f"{'noise':>6} {'router flips':>13} {'tokens w/ flip':>15} {'KL (k3)':>10} {'|dlogp| mean':>13}")
    for noise in args.noise:
        metrics = measure(
            model, tokenizer, prompts, getattr(torch, args.dtype), noise, args.temperature, args.max_tokens, args.seed
        )
        print(
            f"{noise:>6.3f} {metrics['mismatch/router_flips']:>13.4f} {metrics['mismatch/tokens_with_flip']:>15.4f} "
            f"{metrics['mismatch/kl_k3']:>10.2e} {metrics['mismatch/logp_diff_mean']:>13.4f}"
        )


if __name__ == "__main__":
    main()
