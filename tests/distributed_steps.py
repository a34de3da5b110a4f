"""Helper for test_distributed.py (not a test module): a few training steps on one fixed global batch.

Sampled completions cannot be the same in a one-process and a two-process run (each rank draws from its
own random stream and pads its own prompts), so generation is replaced by one fixed global batch of
completions and advantages; everything after generation is the real thing: TRL's training loop, the
forking-token loss, rlvr's router gates and load-balancing loss, the backward, gradient clipping and
AdamW, under DeepSpeed when launched with a ZeRO accelerate config. Each rank takes its consecutive share
of the rows, as TRL's sampler would give it. ``lora`` / ``svf`` train adapters instead of the whole policy
(``peft.method``, routers trained, experts included). ``ep`` loads the policy with expert parallelism over
every rank (``parallel.ep_size``: experts sharded, dense weights under FSDP2), then also saves it and reads the
saved checkpoint back (``saved_parameters``). The arm (default ``forking_router``): ``forking`` (the forking-token
loss alone), ``forking_router`` (plus router and expert gates on forking decisions and a load-balancing loss over
them), ``replay`` (forking_router with recorded experts forced in every training forward: routing replay, one
position in four left to the router). Rank 0 writes ``<out>/steps.json``: the logged metrics of
every step and a fingerprint (sum, sum of squares) of every trained parameter at the end.

    python tests/distributed_steps.py MODEL_DIR OUT_DIR [unequal] [lora | svf] [ep] [forking | replay]
    accelerate launch --config_file <trl>/accelerate_configs/zero3.yaml --num_processes 2 \\
        tests/distributed_steps.py MODEL_DIR OUT_DIR
"""

import contextlib
import json
import os
import sys
import warnings

import torch
from trl import GRPOConfig

from rlvr.cli.shutdown import end_distributed, exit_process
from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import load_pretrained
from rlvr.models.parallel import ParallelConfig
from rlvr.rollouts import ROUTING_KEY
from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.trainer import GROUP_IDS_KEY, ForkingGRPOTrainer
from rlvr.tuning import AdapterConfig, adapter_config

GLOBAL_ROWS, GENERATIONS, PROMPT, COMPLETION, STEPS = 16, 4, 6, 12, 3
ARMS = ("forking", "forking_router", "replay")
LOGGED = (
    "loss",
    "grad_norm",
    "entropy",
    "forking/threshold",
    "forking/kept_tokens",
    "moe/load_balancing_loss",
    "moe/specialization_js",  # routing analytics: every rank's tokens pooled
    "moe/router_entropy_forking",
    "moe/router_entropy_other",
    "moe/load_imbalance",
    "moe/routing_drift",  # replay: how often the live router chose other experts than the forced ones
)


def fixed_global_batch(vocab: int, routing: tuple[int, int, int] | None = None) -> dict:
    """The global batch; with ``routing`` = (layers, experts, k), recorded experts to replay as well."""
    generator = torch.Generator().manual_seed(123)
    completion_mask = torch.ones(GLOBAL_ROWS, COMPLETION, dtype=torch.long)
    lengths = torch.randint(2, COMPLETION + 1, (GLOBAL_ROWS,), generator=generator)
    completion_mask[torch.arange(COMPLETION)[None, :] >= lengths[:, None]] = 0  # right padding
    batch = {
        "prompt_ids": torch.randint(5, vocab, (GLOBAL_ROWS, PROMPT), generator=generator),  # (B, P)
        "prompt_mask": torch.ones(GLOBAL_ROWS, PROMPT, dtype=torch.long),  # (B, P)
        "completion_ids": torch.randint(5, vocab, (GLOBAL_ROWS, COMPLETION), generator=generator),  # (B, C)
        "completion_mask": completion_mask,  # (B, C)
        "advantages": torch.randn(GLOBAL_ROWS, generator=generator),  # (B,)
        "num_items_in_batch": completion_mask.sum(),  # global, as TRL gathers it
        GROUP_IDS_KEY: torch.arange(GLOBAL_ROWS) // GENERATIONS,  # (B,)
    }
    if routing is not None:
        batch[ROUTING_KEY] = recorded_experts(generator, *routing)
    return batch


def recorded_experts(generator: torch.Generator, layers: int, experts: int, k: int) -> torch.Tensor:
    """(B, P + C, layers, k) distinct experts per position (a random choice, as a sampler's router might make);
    one position in four -1 (not recorded: the router's own choice stands)."""
    scores = torch.rand(GLOBAL_ROWS, PROMPT + COMPLETION, layers, experts, generator=generator)
    chosen = scores.topk(k, dim=-1).indices  # (B, P + C, layers, k)
    unrecorded = torch.rand(GLOBAL_ROWS, PROMPT + COMPLETION, generator=generator) < 0.25  # (B, P + C)
    return chosen.masked_fill(unrecorded[:, :, None, None], -1).to(torch.int16)


class FixedBatchTrainer(ForkingGRPOTrainer):
    """Generation replaced by this rank's rows of :func:`fixed_global_batch` (:func:`unequal_shares` with
    ``unequal``)."""

    unequal = False
    generations = 0
    routing: tuple[int, int, int] | None = None  # (layers, experts, k) to replay recorded experts

    def _generate_and_score_completions(self, inputs):
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rows = GLOBAL_ROWS // world
        batch = fixed_global_batch(len(self.processing_class), self.routing)
        shares = [
            {key: value[r * rows : (r + 1) * rows] if value.dim() else value for key, value in batch.items()}
            for r in range(world)
        ]
        if self.unequal:
            shares = unequal_shares(shares, self.generations)
        self.generations += 1
        return shares[rank]


def unequal_shares(shares: list[dict], generation: int) -> list[dict]:
    """The ranks' rows made to differ the way sampling makes them: rank r > 0 has completions 3r tokens
    narrower, two of its rows score nothing at the first generation, and none of its rows at the second
    (no selectable token on that rank). ``num_items_in_batch`` stays the global count, as TRL gathers it."""
    changed = []
    for rank, share in enumerate(shares):
        share = dict(share)
        if rank > 0:
            width = COMPLETION - 3 * rank
            share["completion_ids"] = share["completion_ids"][:, :width]
            if ROUTING_KEY in share:
                share[ROUTING_KEY] = share[ROUTING_KEY][:, : PROMPT + width]
            mask = share["completion_mask"][:, :width].clone()
            if generation == 0:
                mask[:2] = 0  # fewer scored rows than rank 0
            elif generation == 1:
                mask[:] = 0  # nothing to select on this rank
            share["completion_mask"] = mask
        changed.append(share)
    total = sum(share["completion_mask"].sum() for share in changed)
    return [{**share, "num_items_in_batch": total} for share in changed]


def parameter_fingerprint(trainer) -> dict[str, list[float]]:
    """(sum, sum of squares) of every parameter, gathered first under ZeRO-3 (expert parallelism: the full
    tensor of every sharded one)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = list(model.named_parameters())
    gathered = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled and hasattr(named[0][1], "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gathered:
        return moments({name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in named})


def moments(parameters: dict) -> dict[str, list[float]]:
    return {name: [float(p.double().sum()), float(p.double().pow(2).sum())] for name, p in parameters.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    flags = set(sys.argv[3:])
    FixedBatchTrainer.unequal = "unequal" in flags
    method = next((name for name in ("lora", "svf") if name in flags), "none")
    arm = next((name for name in ARMS if name in flags), "forking_router")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(  # built before the model loads, so that ZeRO-3 partitions it as it loads
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=GLOBAL_ROWS // world,
        num_generations=GENERATIONS,
        max_completion_length=COMPLETION,
        use_cpu=True,
        bf16=False,
        report_to=[],
        beta=0.0,
        loss_type="dapo",
        seed=0,
        save_strategy="no",
        router_aux_loss_coef=0.0,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )
    parallel = ParallelConfig(ep_size=world if "ep" in flags else 1)
    model, tokenizer = load_pretrained(model_dir, parallel=parallel)
    adapter = AdapterConfig(method=method, rank=4, svf_cache_dir=os.path.join(out_dir, "svf"))
    moe = MoEConfig()  # forking: the forking-token loss alone (routing analytics on)
    if arm != "forking":  # router and expert gradients from forking decisions, a load-balancing loss over them
        moe = MoEConfig(
            router_gate_scope="forking",
            expert_gate_scope="forking",
            load_balancing_coef=0.01,
            load_balancing_scope="forking",
            routing_replay="old_policy" if arm == "replay" else "none",
        )
    if arm == "replay":
        text = model.config.get_text_config()
        FixedBatchTrainer.routing = (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok)
    trainer = FixedBatchTrainer(
        peft_config=adapter_config(adapter, model),
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 64, 0)),
        processing_class=tokenizer,
        forking=ForkingConfig(rho=0.2, scope="micro_batch", sparse_lm_head="true"),  # LM head on forking tokens
        moe=moe,
    )
    # SVF under ZeRO-3: each matrix's factors are partitioned as they are attached, before DeepSpeed initialises
    factors = [p for n, p in trainer.model.named_parameters() if n.endswith(("_svf_u", "_svf_s", "_svf_vh"))]
    factors_partitioned = bool(factors) and all(hasattr(p, "ds_id") for p in factors)
    trainer.train()
    fingerprint = parameter_fingerprint(trainer)  # a collective under ZeRO-3: every rank takes part
    saved = None
    if parallel.enabled:  # the final model saved whole (every rank takes part) and read back
        trainer.save_model(os.path.join(out_dir, "model"))
        if trainer.accelerator.is_main_process:
            reloaded, _ = load_pretrained(os.path.join(out_dir, "model"))
            saved = moments(dict(reloaded.named_parameters()))
    if trainer.accelerator.is_main_process:
        steps = [
            {key: record[key] for key in LOGGED if key in record}
            for record in trainer.state.log_history
            if "loss" in record
        ]
        with open(os.path.join(out_dir, "steps.json"), "w") as handle:
            json.dump(
                {
                    "world": world,
                    "arm": arm,
                    "deepspeed": trainer.is_deepspeed_enabled,
                    "sparse_head": trainer.sparse_head,
                    "steps": steps,
                    "parameters": fingerprint,
                    "svf_factors_partitioned_before_training": factors_partitioned,
                    "expert_parallel": parallel.ep_size,
                    "saved_parameters": saved,
                },
                handle,
            )


if __name__ == "__main__":
    main()
    end_distributed()  # then no interpreter finalization under live gloo threads (see rlvr.cli.shutdown)
    exit_process(0)
