"""Memory and loss-step time of the model recipes' real geometry, measured on a few layers, extrapolated.

The recipes in rlvr/configs/models/ (Qwen3-30B-A3B, GPT-OSS-20B) name a GPU count. This probe computes it.
It builds each model's real config truncated to a few decoder layers (random init, bf16, one process, ZeRO
off), runs rlvr's loss step (``compute_loss`` + ``backward``, rho 0.2, gradient checkpointing as the recipe
sets it) on one micro-batch of the recipe's shape, and fits two depths to

    activation peak = fixed + per_layer x layers          loss-step time = fixed + per_layer x layers

Each gradient is dropped as soon as it is accumulated, so the peak is activations plus one parameter's
gradient, as under ZeRO, whose gradients leave for their shard as they come. The model states are counted
exactly from the full config (on the meta device) at the ZeRO paper's 16 bytes per parameter for
mixed-precision Adam (Rajbhandari et al., 2020: bf16 weights and gradients, fp32 master weights and two
moments). A recipe with adapters (``peft.method`` lora or svf) keeps the base weights frozen in bf16 (2 bytes
each, plus SVF's frozen singular-value factors) and pays the 16 bytes for its trainable parameters only
(adapters, and routers when they train), counted from the same config by rlvr.tuning's own target
resolution. Per GPU under ZeRO-3 with N GPUs:

    model states / N  +  two gathered layers  +  activations at full depth  +  the recipe's vLLM share

Under expert parallelism over E ranks (``rlvr launch --ep E``; transformers shards each layer's experts over E
ranks and FSDP2 shards everything again over the N / E replicas: the model states are split N ways as under
ZeRO-3) a layer gathers its dense weights whole but only its own E-th of the experts, and the ranks exchange
the routed tokens instead: per GPU

    model states / N  +  two layers (dense whole, experts / E)  +  activations  +  all-to-all buffers  +  vLLM

with the all-to-all buffers of one layer (send and receive, dispatch and combine: 4 x tokens x top-k x hidden
in bf16) and activations as measured in one process, which computes every expert on its own tokens: under
balanced routing a rank computes as many expert rows as its tokens choose. Each layout's fewest GPUs is a
multiple of E.

    python benchmarks/recipe_memory.py                          # on a GPU: both recipes at 2 and 4 layers
    python benchmarks/recipe_memory.py --recipes gpt_oss_20b --gpu-gib 141
    python benchmarks/recipe_memory.py --shrink 64 --rows 2 --prompt 8 --completion 16   # a CPU smoke run
    python benchmarks/recipe_memory.py --states-only --recipes qwen3_30b_a3b,qwen3_30b_a3b_lora,qwen3_30b_a3b_svf
    python benchmarks/recipe_memory.py --states-only --recipes qwen3_30b_a3b_ep   # ZeRO-3 and EP 2 .. 64 layouts

On a CPU there is no allocator peak: the activations column is then the bytes autograd saves for backward,
a lower bound, and the GPU counts printed from it are not an answer.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import SavedBytes, odd_length_reward, quiet, synthetic_batch
from datasets import Dataset
from transformers import AutoModelForCausalLM, GptOssConfig, PretrainedConfig, Qwen3MoeConfig
from trl import GRPOConfig

from rlvr.experiment.compare import load_experiment_config
from rlvr.forking.selection import ForkingConfig
from rlvr.models import build_char_tokenizer
from rlvr.trainer import ForkingGRPOTrainer
from rlvr.tuning import AdapterConfig
from rlvr.tuning.lora import lora_parameter_count
from rlvr.tuning.svf import svf_parameter_count
from rlvr.tuning.targets import resolve_targets
from rlvr.utils.packaged import CONFIG_ROOT

GIB = 2**30
MODEL_STATE_BYTES = 16  # per parameter: mixed-precision Adam under ZeRO (bf16 weight + grad, fp32 master, m, v)
FROZEN_BYTES = 2  # per frozen parameter: its bf16 weight


def qwen3_30b_a3b(layers: int) -> PretrainedConfig:
    """Qwen/Qwen3-30B-A3B's config.json: 48 layers, 128 experts top-8, ~30.5 B parameters."""
    return Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def gpt_oss_20b(layers: int) -> PretrainedConfig:
    """openai/gpt-oss-20b's config.json: 24 layers (sliding and full attention alternate), 32 experts top-4."""
    return GptOssConfig(
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        vocab_size=201088,
        sliding_window=128,
        layer_types=["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(layers)],
        tie_word_embeddings=False,
    )


@dataclass
class Recipe:
    config: Callable[[int], PretrainedConfig]  # layers -> the model's config
    layers: int  # the full model's decoder layers


RECIPES = {
    "qwen3_30b_a3b": Recipe(qwen3_30b_a3b, 48),
    "gpt_oss_20b": Recipe(gpt_oss_20b, 24),
    "qwen3_30b_a3b_lora": Recipe(qwen3_30b_a3b, 48),
    "gpt_oss_20b_lora": Recipe(gpt_oss_20b, 24),
    "qwen3_30b_a3b_svf": Recipe(qwen3_30b_a3b, 48),  # the lora recipe with peft.method=svf
    "qwen3_30b_a3b_ep": Recipe(qwen3_30b_a3b, 48),  # expert parallelism (parallel.ep_size)
}
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def recipe_settings(name: str):
    """The recipe's config (rlvr/configs/models/<name>.yaml); ``<model>_svf`` is ``<model>_lora`` with
    ``peft.method=svf``."""
    if name.endswith("_svf"):
        return load_experiment_config(
            CONFIG_ROOT / "models" / f"{name.removesuffix('_svf')}_lora.yaml", ["peft.method=svf"]
        )
    return load_experiment_config(CONFIG_ROOT / "models" / f"{name}.yaml")


def shrunk(config: PretrainedConfig, factor: int) -> PretrainedConfig:
    """Every width (a multiple of 8) and the expert count (not below 2 x top-k) divided by ``factor``: a
    CPU-sized model."""
    if factor == 1:
        return config
    for name in ("hidden_size", "intermediate_size", "moe_intermediate_size", "head_dim", "vocab_size"):
        if getattr(config, name, None):
            setattr(config, name, max(8, getattr(config, name) // factor // 8 * 8))  # grouped_mm: 16-byte strides
    for name in ("num_experts", "num_local_experts"):
        if getattr(config, name, None):
            setattr(config, name, max(2 * config.num_experts_per_tok, getattr(config, name) // factor))
    return config


def parameter_count(config: PretrainedConfig, experts_only: bool = False) -> int:
    """Parameters of the model (``experts_only``: of its routed experts, which expert parallelism shards)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for name, p in model.named_parameters() if not experts_only or ".experts." in name)


@dataclass
class Counted:
    """The parameters of a recipe's model as its ``peft`` section trains them."""

    parameters: int  # the base model's
    trainable: int  # what the optimizer updates: everything (full fine-tuning), or adapters and routers
    frozen_extra: int = 0  # frozen parameters an adapter adds (SVF's U, s, V^T)

    trainable_base: int = 0  # base parameters among the trainable ones (all of them, or the routers)

    @property
    def state_bytes(self) -> int:
        frozen = self.parameters - self.trainable_base + self.frozen_extra
        return FROZEN_BYTES * frozen + MODEL_STATE_BYTES * self.trainable


def counted(config: PretrainedConfig, adapter: AdapterConfig) -> Counted:
    """Exact counts from the config on the meta device, with the targets rlvr.tuning resolves for ``adapter``."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    if not adapter.enabled:
        return Counted(parameters, parameters, 0, parameters)
    targets = resolve_targets(model, list(adapter.target_modules), adapter.experts)
    routers = sum(p.numel() for path in targets.routers for p in model.get_submodule(path).parameters())
    routers = routers if adapter.routers == "train" else 0
    if adapter.method == "lora":
        return Counted(parameters, lora_parameter_count(targets, model, adapter.rank) + routers, 0, routers)
    vectors, factors = svf_parameter_count(model, targets)
    return Counted(parameters, vectors + routers, factors, routers)


@dataclass
class Measured:
    layers: int
    weight_bytes: int
    activation_bytes: int  # CUDA: allocator peak above the weights; CPU: saved-for-backward bytes
    seconds: float


def measure(config: PretrainedConfig, grpo: dict, args, device: torch.device) -> Measured:
    """One truncated model: weights, and the activation peak and median time of rlvr's loss step."""
    tokenizer = build_char_tokenizer()
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for parameter in model.parameters():  # free each gradient as it arrives (ZeRO hands it to its shard)
        parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = ForkingGRPOTrainer(
            model=model,
            reward_funcs=odd_length_reward,
            args=GRPOConfig(
                output_dir=scratch,
                per_device_train_batch_size=args.rows,
                num_generations=args.rows,
                max_completion_length=args.completion,
                gradient_checkpointing=bool(grpo.get("gradient_checkpointing", False)),
                loss_type=grpo.get("loss_type", "dapo"),
                beta=0.0,
                bf16=device.type == "cuda",
                use_cpu=device.type != "cuda",
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
            ),
            train_dataset=Dataset.from_dict({"prompt": ["1+1="] * args.rows}),
            processing_class=tokenizer,
            forking=ForkingConfig(rho=args.rho),
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = synthetic_batch(config.vocab_size, args.rows, args.prompt, args.completion, device)
        seconds, activations = [], 0
        for _ in range(1 + args.repeats):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with SavedBytes() as saved:
                loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            if trainer.router_updates is not None:
                trainer.router_updates.release()
            if device.type == "cuda":
                torch.cuda.synchronize()
                activations = torch.cuda.max_memory_allocated() - before
            else:
                activations = saved.total
            seconds.append(time.perf_counter() - start)
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Measured(config.num_hidden_layers, weight_bytes, activations, statistics.median(seconds[1:]))


def fit(measured: list[Measured], value: str) -> tuple[float, float]:
    """(fixed, per layer) of ``value`` by least squares over the measured depths."""
    xs = [m.layers for m in measured]
    ys = [getattr(m, value) for m in measured]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    per_layer = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - per_layer * mean_x, per_layer


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB / 10 else f"{nbytes / 2**20:.2f} MiB"


@dataclass
class Plan:
    """Per-GPU memory of a recipe under ZeRO-3: exact counts from the config, plus measured activations."""

    parameters: int  # the whole model
    state_bytes: float  # model states of the whole model (full fine-tuning: 16 B per parameter)
    trainable: int  # parameters the optimizer updates
    layer_parameters: int  # one decoder layer: ZeRO-3 gathers about two at a time (the one running, the next)
    activations: float  # bytes at full depth; 0 when not measured
    vllm: float  # bytes the colocated vLLM engine holds during training (0: not colocated, or asleep)
    gpu: float  # bytes per GPU
    layer_expert_parameters: int = 0  # the routed experts' share of one layer (expert parallelism shards them)
    exchange_bytes: float = 0.0  # expert parallelism: one layer's all-to-all buffers (dispatch and combine)

    def per_gpu(self, gpus: int, offload: bool = False, ep: int = 1) -> float:
        """Bytes per GPU on ``gpus`` GPUs: ZeRO-3 (``ep`` 1) or experts over ``ep`` ranks under FSDP2."""
        states = 0.0 if offload else self.state_bytes / gpus
        gathered = self.layer_parameters - self.layer_expert_parameters * (1 - 1 / ep)  # dense whole, experts / ep
        exchange = self.exchange_bytes if ep > 1 else 0.0
        return states + 2 * 2 * gathered + self.activations + exchange + self.vllm

    def fewest_gpus(self, ep: int = 1) -> int | None:
        """Fewest GPUs with a share that fits, a multiple of ``ep`` (None: not even the unsharded part fits)."""
        room = self.gpu - self.per_gpu(1, offload=True, ep=ep)
        return ep * math.ceil(max(1, math.ceil(self.state_bytes / room)) / ep) if room > 0 else None


def plan(recipe: Recipe, grpo: dict, adapter: AdapterConfig, activations: float, args) -> Plan:
    colocated = bool(grpo.get("use_vllm")) and grpo.get("vllm_mode", "server") == "colocate"
    awake = colocated and not grpo.get("vllm_enable_sleep_mode", False)
    gpu = args.gpu_gib * GIB
    one, two = (parameter_count(shrunk(recipe.config(layers), args.shrink)) for layers in (1, 2))
    experts = parameter_count(shrunk(recipe.config(1), args.shrink), experts_only=True)
    count = counted(shrunk(recipe.config(recipe.layers), args.shrink), adapter)
    config = shrunk(recipe.config(1), args.shrink)
    tokens = args.rows * (args.prompt + args.completion) if hasattr(args, "rows") else 0
    return Plan(
        parameters=count.parameters,
        state_bytes=count.state_bytes,
        trainable=count.trainable,
        layer_parameters=round((two - one) * (1 + count.frozen_extra / count.parameters)),  # SVF's factors too
        activations=activations,
        vllm=float(grpo.get("vllm_gpu_memory_utilization", 0.9)) * gpu if awake else 0.0,
        gpu=gpu,
        layer_expert_parameters=experts,
        exchange_bytes=4 * tokens * config.num_experts_per_tok * config.hidden_size * 2,
    )


def expert_parallel_sizes(config: PretrainedConfig, largest: int = 64) -> list[int]:
    """The expert-parallel sizes a layout can use: powers of two that divide the expert count."""
    experts = next(getattr(config, name) for name in EXPERT_COUNT_FIELDS if getattr(config, name, None))
    return [size for size in (2, 4, 8, 16, 32, 64) if size <= min(largest, experts) and experts % size == 0]


def report(
    name: str, recipe: Recipe, grpo: dict, adapter: AdapterConfig, measured: list[Measured], args, device
) -> None:
    activations, step = 0.0, None
    print(
        f"\n{name}: {recipe.layers} layers; micro-batch {args.rows} x ({args.prompt} + {args.completion}) tokens, "
        f"rho {args.rho}, gradient checkpointing {'on' if grpo.get('gradient_checkpointing') else 'off'}"
    )
    if measured:
        kind = "allocator peak" if device.type == "cuda" else "saved for backward (CPU: a lower bound)"
        print(f"  {'layers':>6} {'weights':>12} {'activations':>12} {'loss step s':>12}   activations: {kind}")
        for m in measured:
            print(f"  {m.layers:>6} {size(m.weight_bytes):>12} {size(m.activation_bytes):>12} {m.seconds:>12.3f}")
        act_fixed, act_layer = fit(measured, "activation_bytes")
        time_fixed, time_layer = fit(measured, "seconds")
        activations, step = act_fixed + act_layer * recipe.layers, time_fixed + time_layer * recipe.layers
        print(
            f"  per layer: activations {size(act_layer)}, loss step {time_layer:.3f} s; "
            f"the rest (embeddings, head, logits): {size(act_fixed)}, {time_fixed:.3f} s"
        )
    budget = plan(recipe, grpo, adapter, activations, args)
    trained = "all" if budget.trainable == budget.parameters else f"{budget.trainable / 1e6:.1f} M ({adapter.method})"
    print(
        f"  {budget.parameters / 1e9:.2f} B parameters, trainable: {trained}; model states {size(budget.state_bytes)}"
        f" ({MODEL_STATE_BYTES} B per trainable parameter, {FROZEN_BYTES} B per frozen one), one layer "
        f"{size(2 * budget.layer_parameters)} in bf16"
    )
    if measured:
        print(f"  full depth: activations {size(activations)}, loss step {step:.2f} s per micro-batch")
    else:
        print("  activations not measured (--states-only): every total below is a lower bound")
    print(
        f"  per {args.gpu_gib:g} GiB GPU under ZeRO-3 = states / N + two gathered layers + activations"
        f" + vLLM ({size(budget.vllm)} held during training):"
    )
    for count in (8, 16, 32, 64):
        total = budget.per_gpu(count)
        print(f"    {count:>3} GPUs: {size(total):>11} {'fits' if total <= budget.gpu else 'does not fit'}")
    offloaded = budget.per_gpu(1, offload=True)
    print(
        f"    --offload (states in host memory, {size(budget.state_bytes)} over all nodes): "
        f"{size(offloaded)} per GPU, {'fits' if offloaded <= budget.gpu else 'does not fit'}"
    )
    needed = budget.fewest_gpus()
    tensor_parallel = int(grpo.get("vllm_tensor_parallel_size", 1)) if budget.vllm else 1
    if needed is not None and needed < tensor_parallel:
        print(f"  fewest GPUs without offload: {tensor_parallel} (vLLM's tensor parallel; {needed} by memory alone)")
    else:
        print(f"  fewest GPUs without offload: {needed if needed is not None else 'none'}")
    if adapter.enabled:
        print("  expert parallelism: not with adapters yet (rlvr refuses peft.method under parallel.ep_size)")
    else:
        layouts(budget, recipe, args, getattr(args, "recipe_ep", 1))
    if budget.vllm:
        tensor_parallel = int(grpo.get("vllm_tensor_parallel_size", 1))
        engine = 2 * budget.parameters / tensor_parallel
        left = budget.vllm - engine
        verdict = f"leaves {size(left)} of its share for KV cache" if left > 0 else "more than its share"
        print(f"  vLLM: bf16 weights {size(engine)} per GPU at tensor parallel {tensor_parallel}: {verdict}")


def layouts(budget: Plan, recipe: Recipe, args, recipe_ep: int) -> None:
    """ZeRO-3 beside each expert-parallel size: the layer a rank gathers, bytes per GPU, the fewest GPUs."""
    print(
        f"  layouts (per {args.gpu_gib:g} GiB GPU; EP adds {size(budget.exchange_bytes)} of all-to-all buffers; "
        f"* = this recipe's):"
    )
    print(f"    {'layout':<8} {'gathered layer':>14} {'8 GPUs':>11} {'16 GPUs':>11} {'32 GPUs':>11} {'fewest':>7}")
    for ep in [1, *expert_parallel_sizes(shrunk(recipe.config(1), args.shrink))]:
        gathered = 2 * (budget.layer_parameters - budget.layer_expert_parameters * (1 - 1 / ep))
        cells = [size(budget.per_gpu(count, ep=ep)) if count % ep == 0 else "-" for count in (8, 16, 32)]
        fewest = budget.fewest_gpus(ep)
        label = ("ZeRO-3" if ep == 1 else f"EP {ep}") + ("*" if ep == recipe_ep else "")
        print(f"    {label:<8} {size(gathered):>14} {cells[0]:>11} {cells[1]:>11} {cells[2]:>11} {fewest or 'none':>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--layers", default="2,4", help="truncated depths to measure (at least two)")
    parser.add_argument("--rows", type=int, default=None, help="completions per micro-batch (default: the recipe's)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row (GSM8K with its system prompt)")
    parser.add_argument("--completion", type=int, default=None, help="completion tokens (default: the recipe's max)")
    parser.add_argument("--rho", type=float, default=0.2, help="forking fraction")
    parser.add_argument("--repeats", type=int, default=3, help="timed loss steps per depth (after one warm-up)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of the GPUs to plan for (H100: 80)")
    parser.add_argument("--shrink", type=int, default=1, help="divide every width by this (a CPU-sized smoke run)")
    parser.add_argument(
        "--states-only", action="store_true", help="measure nothing: the exact counts only (runs anywhere, fast)"
    )
    args = parser.parse_args()
    depths = [] if args.states_only else sorted({int(value) for value in args.layers.split(",")})
    if len(depths) == 1:
        parser.error("--layers needs at least two depths to fit a per-layer cost")
    quiet()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"recipe geometry probe on {name}")
    for recipe_name in args.recipes.split(","):
        recipe = RECIPES[recipe_name]
        settings = recipe_settings(recipe_name)
        grpo, adapter = settings.grpo, settings.peft
        shape = argparse.Namespace(  # the recipe's micro-batch unless given
            **{
                **vars(args),
                "rows": args.rows or int(grpo["per_device_train_batch_size"]),
                "completion": args.completion or int(grpo["max_completion_length"]),
                "recipe_ep": settings.parallel.ep_size,
            }
        )
        measured = [measure(shrunk(recipe.config(layers), args.shrink), grpo, shape, device) for layers in depths]
        report(recipe_name, recipe, grpo, adapter, measured, shape, device)


if __name__ == "__main__":
    main()
