"""Helper for test_library.py (not a test module): ForkingGRPOTrainer given a model *path*, as in TRL's docs.

TRL loads the policy and (with beta > 0) the reference model inside ``GRPOTrainer.__init__``; under
ZeRO-3 every MoE block of both must be a leaf module before DeepSpeed wraps them. Rank 0 writes
``<out>/library.json``: which blocks were leaves, and the steps trained.

    accelerate launch --config_file <trl>/accelerate_configs/zero3.yaml --num_processes 2 \\
        tests/library_steps.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from trl import GRPOConfig

from rlvr import ForkingConfig, ForkingGRPOTrainer, MoEConfig, arithmetic_exact
from rlvr.cli.shutdown import end_distributed, exit_process
from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.moe import find_moe_layers


def leaf_flags(model: torch.nn.Module) -> list[bool]:
    return [bool(getattr(layer.block, "_z3_leaf", False)) for layer in find_moe_layers(model)]


def main() -> None:
    warnings.filterwarnings("ignore")
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        beta=0.04,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
    )
    trainer = ForkingGRPOTrainer(
        model=model_dir,  # a path: TRL loads the model
        reward_funcs=arithmetic_exact,
        args=args,
        train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 32, 0)),
        forking=ForkingConfig(rho=0.2),
        moe=MoEConfig(router_gate_scope="forking", expert_gate_scope="forking"),
    )
    flags = {"policy": leaf_flags(trainer.model), "reference": leaf_flags(trainer.ref_model)}
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out_dir, "library.json"), "w") as handle:
            json.dump(
                {"leaves": flags, "steps": trainer.state.global_step, "deepspeed": trainer.is_deepspeed_enabled}, handle
            )


if __name__ == "__main__":
    main()
    end_distributed()  # then no interpreter finalization under live gloo threads (see rlvr.cli.shutdown)
    exit_process(0)
