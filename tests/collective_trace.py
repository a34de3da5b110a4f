"""Helper for test_collectives.py (not a test module): run a program with every ``torch.distributed``
collective of this rank recorded, and with this rank's data made unequal to the other ranks'.

    accelerate launch ... tests/collective_trace.py TRACE_DIR SKEW -m rlvr.cli quickstart ...
    torchrun ... tests/collective_trace.py TRACE_DIR SKEW tests/distributed_steps.py MODEL OUT

Each rank appends one JSON line per collective to ``TRACE_DIR/rank<r>.jsonl`` as it is issued
(``[op, dtype, shape]`` of the tensor it sends; the object collectives record their name, and the tensor
collectives they are made of are recorded too). A line is written before the collective runs, so a rank
that dies inside a mismatched collective still shows it. Ranks that issue the same collectives in the same
order, with the same dtypes and shapes, write identical files.

SKEW (an int) makes the ranks' data differ the way sampling does: rank r generates at most
``max_new_tokens - SKEW * r`` tokens, so its completions are narrower than rank 0's, and the same width
difference reaches every gather of the step.
"""

import functools
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

# collective -> (position, keyword) of the tensor it sends; None: nothing to describe
SENT = {
    "all_reduce": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"),
    "gather": (0, "tensor"),
    "scatter": (0, "tensor"),
    "all_to_all": (1, "input_tensor_list"),
    "all_to_all_single": (1, "input"),
    "all_gather_single": (1, "input_tensor"),  # FSDP2's all-gather (torch >= 2.12)
    "reduce_scatter_single": (1, "input"),  # FSDP2's reduce-scatter
    "all_gather_coalesced": (1, "input_tensor_list"),
    "all_reduce_coalesced": (0, "tensors"),
    "_all_gather_base": (1, "input_tensor"),
    "_reduce_scatter_base": (1, "input"),
    "monitored_barrier": None,
    "barrier": None,
    "all_gather_object": None,
    "broadcast_object_list": None,
    "gather_object": None,
    "scatter_object_list": None,
}


# functional collectives (DTensor, transformers' expert-parallel all-to-all): recorded as "functional.<name>",
# the tensor they send is always the first argument
FUNCTIONAL = ("all_to_all_single", "all_to_all_single_autograd", "all_gather_tensor", "all_gather_tensor_autograd")
FUNCTIONAL += ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_tensor_autograd", "broadcast")


def describe(value) -> list:
    """dtype and shape of a tensor (or of the first tensor of a list of tensors)."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        value = value[0]
    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape)]
    return []


def record_collectives(path: str) -> None:
    def recorded(name, function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            where = SENT.get(name, (0, "self"))
            sent = None if where is None else (args[where[0]] if len(args) > where[0] else kwargs.get(where[1]))
            with open(path, "a") as handle:
                handle.write(json.dumps([name, *describe(sent)]) + "\n")
            return function(*args, **kwargs)

        return call

    for name in FUNCTIONAL:  # before transformers imports them by name
        if hasattr(funcol, name):
            setattr(funcol, name, recorded(f"functional.{name}", getattr(funcol, name)))
    for name in SENT:
        if not hasattr(c10d, name):
            continue  # an op of another torch version
        original = getattr(c10d, name)
        wrapped = recorded(name, original)
        setattr(c10d, name, wrapped)  # what torch's own object collectives call
        setattr(dist, name, wrapped)  # what accelerate, DeepSpeed and rlvr call


def skew_generation(skew: int) -> None:
    """Rank r samples at most ``max_new_tokens - skew * r`` tokens (the trainer's generation config)."""
    from rlvr.trainer import ForkingGRPOTrainer

    rank = int(os.environ.get("RANK", "0"))
    original_init = ForkingGRPOTrainer.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        config = self.generation_config
        config.max_new_tokens = max(1, int(config.max_new_tokens) - skew * rank)

    ForkingGRPOTrainer.__init__ = init


def main() -> None:
    trace_dir, skew, *program = sys.argv[1:]
    os.makedirs(trace_dir, exist_ok=True)
    record_collectives(os.path.join(trace_dir, f"rank{os.environ.get('RANK', '0')}.jsonl"))
    if int(skew):
        skew_generation(int(skew))
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
