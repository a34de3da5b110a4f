"""Which weights of a policy an adapter trains: linear layers named by the user, the routed experts, the routers.

Shared by LoRA (:mod:`rlvr.tuning.lora`) and SVF (:mod:`rlvr.tuning.svf`), so that both train the same
matrices of a policy and an arm comparing them differs in the method alone.

* **Linear layers**: each entry of ``peft.target_modules`` names modules by the last part of their path
  (``q_proj``) or a module whose linear layers are all taken (``self_attn``, the default: every projection of
  the attention, whatever the family calls them: DeepSeek-V3's ``kv_a_proj_with_mqa``, Qwen3-Next's linear
  attention). Routers and the routed experts are never taken through this list.
* **Routed experts**: in transformers 5 every family in :data:`rlvr.moe.ADAPTERS` keeps its routed experts as
  fused 3D parameters ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I) (GPT-OSS and
  Llama 4 store them transposed, (E, H, 2I) and (E, I, H)); shared experts are plain linear layers beside them.
* **Routers**: the router module of each sparse block (:func:`rlvr.moe.find_moe_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rlvr.moe import UnknownMoEArchitecture, find_moe_layers
from rlvr.utils.options import ConfigError

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # the fused routed-expert matrices of every family


@dataclass(frozen=True)
class ExpertParameter:
    """One fused routed-expert matrix: ``getattr(module_at(path), name)``, shape (E, rows, columns)."""

    path: str  # module path of the experts module, e.g. "model.layers.3.mlp.experts"
    name: str  # "gate_up_proj" or "down_proj"

    @property
    def key(self) -> str:
        return f"{self.path}.{self.name}"


@dataclass(frozen=True)
class Targets:
    """What an adapter trains in one policy."""

    linear: tuple[str, ...]  # module paths of the nn.Linear layers adapted
    experts: tuple[ExpertParameter, ...]  # routed-expert matrices adapted
    routers: tuple[str, ...]  # module paths of the routers (trained as full parameters or frozen)


def _is_inside(path: str, scopes: tuple[str, ...]) -> bool:
    return any(path == scope or path.startswith(scope + ".") for scope in scopes)


def resolve_targets(model: nn.Module, target_modules: list[str], experts: bool) -> Targets:
    """The linear layers ``target_modules`` names, the routed-expert matrices (``experts``) and the routers of
    ``model``. Every entry must match at least one linear layer: the error names the policy's linear layers
    and module types."""
    try:
        layers = find_moe_layers(model)
    except UnknownMoEArchitecture:
        layers = []  # a dense policy: linear layers only
    path_of = {id(module): name for name, module in model.named_modules()}
    routers = tuple(path_of[id(layer.router)] for layer in layers)
    expert_modules = tuple(
        path_of[id(layer.block.experts)]
        for layer in layers
        if isinstance(getattr(layer.block, "experts", None), nn.Module)
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = routers + expert_modules  # never adapted as plain linear layers
    linear_paths = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and not _is_inside(name, excluded)
    ]
    chosen: list[str] = []
    for entry in target_modules:
        matched = [path for path in linear_paths if path.split(".")[-1] == entry or f".{entry}." in f".{path}"]
        if not matched:
            leaf_names = sorted({path.split(".")[-1] for path in linear_paths})
            parents = {path.rpartition(".")[0] for path in linear_paths}
            module_types = sorted({type(model.get_submodule(parent)).__name__ for parent in parents if parent})
            raise ConfigError(
                f"peft.target_modules: {entry!r} matches no linear layer of the policy; its linear layers are named "
                f"{', '.join(leaf_names)} (inside {', '.join(module_types[:12])})"
            )
        chosen += [path for path in matched if path not in chosen]
    expert_parameters: list[ExpertParameter] = []
    if experts:
        if not layers:
            raise ConfigError("peft.experts: the policy has no sparse MoE block; set peft.experts=false")
        for path in expert_modules:
            module = model.get_submodule(path)
            for name in EXPERT_PARAMETERS:
                if isinstance(getattr(module, name, None), nn.Parameter):
                    expert_parameters.append(ExpertParameter(path, name))
        if not expert_parameters:
            raise ConfigError(
                "peft.experts: no fused routed-expert parameters (experts.gate_up_proj / experts.down_proj) in "
                f"{type(model).__name__}; set peft.experts=false"
            )
    return Targets(tuple(chosen), tuple(expert_parameters), routers)
