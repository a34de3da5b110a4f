"""Helper for test_collectives.py (not a test module): one capability after another in one launch.

    <rlvr launch's accelerate command> tests/collective_trace.py TRACE_DIR SKEW tests/arm_matrix.py \
        TRACE_DIR OUT ARM[,ARM...]

Each arm is ``rlvr train --config quickstart --arm ...`` on a small tiny MoE, run by ``rlvr.cli.main.main`` in this
process, one after another. Before each, every rank writes ``["arm", NAME]`` into its collective trace, so a
mismatch is named by the arm it happened in. The first arm builds the tiny policy and a short warm start (the
launch's cache starts empty) and saves the final model; the others reuse the cache and save nothing.
"""

import os
import sys

STEPS = 6
COMMON = [
    "model.tiny.num_layers=2",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=64",
    "eval.enabled=false",
    "save_model=false",
    f"grpo.max_steps={STEPS}",
    "grpo.logging_steps=1",
    "grpo.per_device_train_batch_size=8",
    "grpo.num_generations=4",
    "grpo.max_completion_length=12",
    "grpo.disable_tqdm=true",
    "reward.functions=[matrix_rewards:one_in_six]",
    "warm_start.max_steps=4",
    "warm_start.eval_every=2",
    "warm_start.num_dev=8",
]
# name -> (arm, overrides): one arm per capability
ARMS = {
    "forking": ("forking", ["save_model=true"]),  # the tiny policy, the warm start and the final model saved
    "forking_router": ("forking_router", []),
    "tree": ("tree", ["rollout.branches=1"]),
    "replay": ("replay", []),  # the routing recorded while sampling (the copy engine refuses ZeRO-3)
    "dynamic": ("dynamic", ["prompts.max_draws=2"]),
    "skip_both": ("skip_both", ["prompts.max_draws=2"]),
    "prune_both": ("prune_both", []),
    "clip_cov": ("clip_cov", []),
    "kl_cov": ("kl_cov", []),
    "entropy_advantage": ("entropy_advantage", []),
    "archer": ("archer", []),  # a clip range per token, the reference model's KL (ZeRO-3 partitions it too)
    "stapo": ("stapo", ["token_rules.stapo_probability=1.0", "token_rules.stapo_entropy_quantile=0.5"]),  # silences
    "gtpo": ("gtpo", []),  # every rank's rows with their prompt groups
    "grpo_s": ("grpo_s", []),
    "lora": ("lora", ["save_model=true"]),
    "svf": ("svf", ["save_model=true"]),
}


def main() -> int:
    from rlvr.cli import commands
    from rlvr.cli.main import main as rlvr
    from rlvr.cli.shutdown import end_distributed

    commands.end_distributed = lambda: None  # one process group for every arm; destroyed at the end

    trace_dir, out, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    trace = os.path.join(trace_dir, f"rank{os.environ.get('RANK', '0')}.jsonl")
    code = 0
    for name in names:
        arm, overrides = ARMS[name]
        with open(trace, "a") as handle:
            handle.write(f'["arm", "{name}"]\n')
        code = rlvr(["train", "--config", "quickstart", "--arm", arm, *COMMON, *overrides, f"output_dir={out}/{name}"])
        if code:
            break
    end_distributed()
    return code


if __name__ == "__main__":
    from rlvr.cli.shutdown import exit_process

    exit_process(main())
