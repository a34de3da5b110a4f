"""The ``rollout`` config section: how the completions of a generation batch are sampled."""

from __future__ import annotations

from dataclasses import dataclass

from rlvr.utils.options import option, require

MODES = ("iid", "forking_tree")
ADVANTAGES = ("group", "treerl")
ENGINES = ("policy", "copy")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


@dataclass
class RolloutConfig:
    """The ``rollout`` config section (also ``ForkingGRPOTrainer(rollout=...)``)."""

    mode: str = option(
        "iid",
        "iid: G independent samples per prompt (TRL's); forking_tree: roots branched at their forking tokens",
        MODES,
    )
    branches: int = option(3, "forking_tree: branches per root, N; roots per prompt M = num_generations / (1 + N)")
    min_prefix: int = option(2, "forking_tree: no branch at the first min_prefix completion tokens")
    min_suffix: int = option(2, "forking_tree: no branch at the last min_suffix tokens of a root (EOS counted)")
    min_spacing: int = option(2, "forking_tree: minimum distance between two branch positions of one root")
    advantage: str = option(
        "group",
        "group: TRL's group-relative advantage over the G leaves; treerl: TreeRL's per-segment advantages",
        ADVANTAGES,
    )
    reuse_cache: bool = option(
        True, "forking_tree: branches continue from the root's KV cache (else each branch re-reads its prefix)"
    )

    engine: str = option(
        "policy",
        "policy: sample with the policy itself (transformers' generate); copy: with a copy of its weights in "
        "rollout.dtype, synced after every optimizer step, as an inference engine with numerics of its own",
        ENGINES,
    )
    dtype: str = option(
        "auto",
        "engine=copy: the copy's precision (auto: the policy's), e.g. bfloat16 while training in float32",
        ENGINE_DTYPES,
    )
    router_noise: float = option(
        0.0, "engine=copy: noise on every MoE router's logits, in units of their std over experts (0: none)"
    )

    def validate(self) -> None:
        require(self.router_noise >= 0.0, "router_noise", "must be >= 0")
        if self.engine == "policy":
            require(self.dtype == "auto", "dtype", "sets the copy engine's precision: needs rollout.engine=copy")
            require(self.router_noise == 0.0, "router_noise", "perturbs the copy engine: needs rollout.engine=copy")
        else:
            require(
                self.mode == "iid",
                "engine",
                "copy samples i.i.d. completions; forking trees sample with the policy (rollout.engine=policy)",
            )
        require(self.branches >= 1, "branches", "must be >= 1")
        require(self.min_prefix >= 0, "min_prefix", "must be >= 0")
        require(self.min_suffix >= 0, "min_suffix", "must be >= 0")
        require(self.min_spacing >= 1, "min_spacing", "must be >= 1")
        if self.mode == "iid":
            require(self.advantage == "group", "advantage", "treerl needs rollout.mode=forking_tree (a tree)")

    def roots_per_prompt(self, num_generations: int) -> int:
        """M, with M * (1 + N) = G; raises ValueError when N + 1 does not divide G."""
        if num_generations % (1 + self.branches):
            raise ValueError(
                f"branches: forking_tree makes (1 + branches) leaves per root, which must divide num_generations "
                f"({num_generations}); branches={self.branches} does not"
            )
        return num_generations // (1 + self.branches)

    def check_engine(self, unsupported: list[str]) -> None:
        """What ``engine: copy`` cannot run with, as a ValueError naming this section's field: any of
        ``unsupported`` (the active features it does not support, e.g. ``use_vllm``, which is an engine already)."""
        if self.engine == "copy" and unsupported:
            raise ValueError(f"engine: copy stands in for an inference engine; it does not run with {unsupported[0]}")

    def check_loss(self, loss_type: str, off_policy_mask: bool, importance_sampling_mode: str | None) -> None:
        """TRL loss settings this section cannot run with, as a ValueError naming this section's field.

        Args:
            loss_type: TRL's ``loss_type``.
            off_policy_mask: whether TRL's off-policy sequence mask is on (``off_policy_mask_threshold``).
            importance_sampling_mode: TRL's ``vllm_importance_sampling_mode`` when its correction is on, else None.
        """
        if self.advantage == "treerl":
            # TreeRL's advantages are per token (B, T); these TRL rules read one advantage per sequence
            for name, on in (("loss_type=vespo", loss_type == "vespo"), ("off_policy_mask_threshold", off_policy_mask)):
                if on:
                    raise ValueError(
                        f"advantage: treerl gives per-token advantages; TRL's {name} needs one per sequence"
                    )
        if (
            self.engine == "copy"
            and loss_type == "vespo"
            and importance_sampling_mode not in (None, "token_truncate", "token_mask")
        ):
            # TRL checks this in its __init__ for use_vllm, which the copy engine switches on only after it
            raise ValueError(
                "engine: copy runs TRL's vLLM path, and TRL's VESPO loss needs vllm_importance_sampling_mode "
                f"token_truncate or token_mask (got {importance_sampling_mode})"
            )

    def check_run(self, num_generations: int, rows_per_process: int, unsupported: list[str]) -> None:
        """What ``forking_tree`` cannot run with, as a ValueError naming this section's field: any of
        ``unsupported`` (the active features it does not support yet, e.g. ``use_vllm``), a G that
        ``1 + branches`` does not divide, a process whose generation batch would split a group (each
        process grows whole trees: ``rows_per_process`` = per_device_train_batch_size x steps_per_generation)."""
        if self.mode != "forking_tree":
            return
        if unsupported:
            raise ValueError(
                f"mode: forking_tree samples with transformers' generate(); {unsupported[0]} is not supported "
                "with it yet (ARCHITECTURE.md: forking trees with vLLM)"
            )
        self.roots_per_prompt(num_generations)
        if rows_per_process % num_generations:
            raise ValueError(
                f"mode: forking_tree grows each prompt's {num_generations} completions on one process: "
                f"per_device_train_batch_size x steps_per_generation ({rows_per_process}) must be a multiple of "
                "num_generations"
            )
