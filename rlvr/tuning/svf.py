"""Singular-value fine-tuning (SVF): a vector per matrix that scales its singular values.

Transformer² (Sun et al., 2025, *Transformer-Squared: Self-adaptive LLMs*, arXiv 2501.06252, sec. 3.1) writes a
weight as ``W = U diag(s) V^T`` and trains only a vector ``z`` per matrix: ``W' = U diag(s * z) V^T``, with
RL (their "expert vectors"). Here every targeted matrix is kept and adapted as

    W' = W + U diag(s * dz) V^T        z = 1 + dz, dz initialised to zeros

which is Transformer²'s ``W'`` (exactly, for the exact SVD) and equals ``W`` bit for bit at init in any
dtype: the policy's forward is unchanged until ``z`` moves. The trained parameter is the offset ``dz``, not
``z``: under bf16 mixed precision (DeepSpeed keeps bf16 copies of the parameters) ``1 + 1e-3`` rounds to 1,
while ``1e-3`` keeps its eight bits of mantissa. Applied to an MoE's routed experts, each expert
matrix gets its own vector: min(rows, columns) numbers per expert matrix.

How the forward sees ``W'`` (no module is replaced; parameter names stay the policy's own):

* ``nn.Linear`` layers: a forward hook adds ``((x V) * s dz) U^T`` to the output (never forms ``W'``).
* fused routed-expert parameters (E, rows, columns): a pre-forward hook on the experts module computes
  ``W + U diag(s dz) V^T`` (E, rows, columns) once per forward, and the experts module (its class swapped for
  a subclass of the same name) reads that where its forward reads the parameter; the parameter itself stays
  registered where it was, as DeepSpeed ZeRO-3 traces it. (Under ZeRO-3 the sparse blocks are leaf modules:
  their parameters, these included, are gathered before the experts' hooks run.)

The factors ``U (.., rows, r)``, ``s (.., r)``, ``V^T (.., r, columns)`` (r = min(rows, columns)) are frozen
parameters of the module that owns the matrix, named ``<matrix>_svf_u`` / ``_svf_s`` / ``_svf_vh``, and ``z``
is ``<matrix>_svf_dz`` (float32); the decompositions are computed once, in float64 for float64 weights and
float32 otherwise, and cached on disk. :func:`merged` folds ``z`` into plain weights (export, weight sync to an
inference engine) and restores the policy after; :func:`save_svf` / :func:`load_svf` write and read the
vectors alone (and the routers, when they train).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from rlvr.models.partitioned import gathered
from rlvr.tuning.targets import Targets, resolve_targets
from rlvr.utils.options import ConfigError

logger = logging.getLogger(__name__)

FACTORS = ("u", "s", "vh")
VECTORS_FILE, ROUTERS_FILE, CONFIG_FILE = "svf_vectors.safetensors", "svf_routers.safetensors", "svf_config.json"


@dataclass
class SVFConfig:
    """What SVF adapts (pass as ``peft_config=`` to :class:`rlvr.trainer.ForkingGRPOTrainer`, as a PEFT config)."""

    target_modules: list[str] = field(default_factory=lambda: ["self_attn"])  # as peft.target_modules
    experts: bool = True  # one vector per routed-expert matrix
    routers: str = "train"  # "train" (full parameters) or "freeze"
    cache_dir: str = ""  # where decompositions are cached ('' = beside the policy when writable)


def has_svf(model: nn.Module) -> bool:
    """Whether :func:`apply_svf` has given ``model`` its vectors."""
    return getattr(model, "svf_config", None) is not None


def _suffix(name: str, part: str) -> str:
    return f"{name}_svf_{part}"


def decompose(weight: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (.., m, r)``, ``s (.., r)``, ``V^T (.., r, n)`` of a (m, n) or (E, m, n) weight, in its dtype; a one-line
    error for a matrix SVF cannot decompose."""
    if weight.ndim not in (2, 3):
        raise ConfigError(f"peft.method: svf cannot decompose {key}: it has {weight.ndim} dimensions, not 2 or 3")
    if not weight.dtype.is_floating_point:
        raise ConfigError(f"peft.method: svf cannot decompose {key}: its dtype is {weight.dtype} (quantized weights?)")
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(work).all():
        raise ConfigError(f"peft.method: svf cannot decompose {key}: it holds inf or nan")
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return tuple(t.to(weight.dtype).contiguous() for t in (u, s, vh))  # DeepSpeed broadcasts contiguous storage


def _factors(module: nn.Module, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (.., m, r)``, ``s dz (.., r)`` and ``V^T (.., r, n)`` of one matrix in ``dtype`` (``s dz`` formed in at
    least float32)."""
    u, s, vh, dz = (getattr(module, _suffix(name, part)) for part in (*FACTORS, "dz"))
    work = torch.promote_types(dtype, torch.float32)
    return u.to(dtype), (s.to(work) * dz.to(work)).to(dtype), vh.to(dtype)


def _delta(module: nn.Module, name: str) -> torch.Tensor:
    """``U diag(s dz) V^T`` of one matrix: (m, n) or (E, m, n), in the factors' dtype."""
    u, scale, vh = _factors(module, name, module._parameters[_suffix(name, "u")].dtype)
    return (u * scale.unsqueeze(-2)) @ vh


def _linear_hook(module: nn.Linear, args, output):
    if module._svf_merged:
        return output
    x = args[0]  # (.., in)
    u, scale, vh = _factors(module, "weight", x.dtype)  # (out, r), (r,), (r, in)
    return output + ((x @ vh.T) * scale) @ u.T  # (.., out)


def _experts_pre_hook(module: nn.Module, args):
    if module._svf_merged:
        return
    for name in module._svf_names:
        weight = module._parameters[name]
        module._svf_values[name] = weight + _delta(module, name).to(weight.dtype)  # (E, m, n), differentiable in dz


def _experts_hook(module: nn.Module, args, output):
    module._svf_values.clear()
    return output


def _adapted_parameter(name: str) -> property:
    """What the experts' forward reads as ``self.<name>``: ``W + U diag(s dz) V^T`` while it runs, else ``W``."""

    def read(module: nn.Module):
        values = module.__dict__.get("_svf_values", {})
        return values[name] if name in values else module._parameters[name]

    return property(read)


def _attach(module: nn.Module, name: str, factors) -> None:
    weight = module._parameters[name]
    for part, tensor in zip(FACTORS, factors, strict=True):
        module.register_parameter(_suffix(name, part), nn.Parameter(tensor.to(weight.device), requires_grad=False))
    s = factors[1]  # (.., r): one vector entry per singular value
    module.register_parameter(_suffix(name, "dz"), nn.Parameter(torch.zeros(s.shape, device=weight.device)))
    if not hasattr(module, "_svf_names"):
        module._svf_names, module._svf_merged, module._svf_values = [], False, {}
        if isinstance(module, nn.Linear):
            module.register_forward_hook(_linear_hook)
        else:
            module.register_forward_pre_hook(_experts_pre_hook)
            module.register_forward_hook(_experts_hook)
    if not isinstance(module, nn.Linear):
        # The parameter stays registered where it is (DeepSpeed ZeRO-3 traces which parameters each module
        # fetches); a subclass of the module's own class, of the same name, reads the adapted value in its place.
        own = type(module)
        if not getattr(own, "_svf_subclass", False):
            own = type(own.__name__, (own,), {"_svf_subclass": True, "__module__": own.__module__})
        setattr(own, name, _adapted_parameter(name))
        module.__class__ = own
    module._svf_names.append(name)


def _matrices(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module, str]]:
    """``(key, owning module, parameter name)`` of every targeted matrix."""
    linear = [(f"{path}.weight", model.get_submodule(path), "weight") for path in targets.linear]
    experts = [(expert.key, model.get_submodule(expert.path), expert.name) for expert in targets.experts]
    return linear + experts


def apply_svf(model: nn.Module, config: SVFConfig) -> Targets:
    """Freeze ``model`` and give each targeted matrix its trainable singular-value vector (routers train as full
    parameters with ``routers="train"``). Returns the targets. In place; the forward is unchanged at init.

    One matrix at a time: under DeepSpeed ZeRO-3 (the policy partitioned as it loaded) each matrix is gathered,
    decomposed and its factors and vector partitioned as the weights are before the next is gathered, so no
    rank ever holds more than one whole matrix and its factors (every rank takes part in each gather)."""
    if has_svf(model):
        raise ValueError("the policy already has SVF vectors")
    targets = resolve_targets(model, list(config.target_modules), config.experts)
    matrices = _matrices(model, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for key, module, name, factors in _factors_one_at_a_time(model, matrices, config.cache_dir):
        _attach(module, name, factors)
        weight = module._parameters[name]
        if hasattr(weight, "ds_id"):  # as DeepSpeed converts parameters it finds unpartitioned at initialize
            added = [module._parameters[_suffix(name, part)] for part in (*FACTORS, "dz")]
            weight.convert_to_zero_parameters(param_list=added)
    if config.routers == "train":
        for path in targets.routers:
            for parameter in model.get_submodule(path).parameters():
                parameter.requires_grad_(True)
    model.svf_config, model.svf_targets = config, targets
    return targets


def _fingerprint(matrices) -> str:
    """A digest of every targeted matrix's values (gathered one at a time under ZeRO-3)."""
    digest = hashlib.sha256()
    for key, module, name in matrices:
        with gathered([module._parameters[name]]):
            weight = module._parameters[name].detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(weight.shape)}:{weight.dtype}".encode())
            digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def _cache_directory(model: nn.Module, cache_dir: str) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if source and os.path.isdir(source) and os.access(source, os.W_OK):
        return Path(source) / "svf"
    return Path(os.path.expanduser("~/.cache/rlvr/svf"))


def _factors_one_at_a_time(model: nn.Module, matrices, cache_dir: str) -> Iterator[tuple]:
    """``(key, module, name, factors)`` of every matrix in turn: read from the cache when the same weights were
    decomposed before (one matrix's factors at a time), else decomposed while the matrix is gathered, and cached.
    Each matrix is gathered either way: a rank that finds the cache and one that does not (another job wrote it
    in between) issue the same collectives."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = _cache_directory(model, cache_dir)
    path = directory / f"factors-{_fingerprint(matrices)}.safetensors"
    with contextlib.ExitStack() as stack:
        cached = stack.enter_context(safe_open(str(path), framework="pt")) if path.is_file() else None
        writes = cached is None and os.environ.get("LOCAL_RANK", "0") == "0"  # one host copy per node, written
        flat = {}
        for key, module, name in matrices:
            with gathered([module._parameters[name]]):
                if cached is not None:
                    factors = tuple(cached.get_tensor(f"{key}.{part}") for part in FACTORS)
                else:
                    factors = decompose(module._parameters[name], key)
            if writes:
                flat.update(
                    {f"{key}.{part}": t.detach().to("cpu", copy=True) for part, t in zip(FACTORS, factors, strict=True)}
                )
            yield key, module, name, factors
    if not writes:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".tmp-{os.getpid()}")
        save_file(flat, str(staging))
        os.replace(staging, path)  # a reader never sees half a file
    except OSError as error:  # a read-only place: decompose again next time
        logger.warning("SVF factors not cached at %s: %s", path, error)


def svf_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The singular-value vectors of ``model`` by name (``<module>.<matrix>_svf_dz``, z - 1)."""
    return {name: p for name, p in model.named_parameters() if name.endswith("_svf_dz")}


def svf_parameter_count(model: nn.Module, targets: Targets) -> tuple[int, int]:
    """(trainable vector entries, frozen factor entries) for ``targets``, from shapes (works on the meta device):
    r = min(rows, columns) per matrix (per expert matrix), and r (rows + columns + 1) frozen per matrix."""
    trainable = frozen = 0
    for key, module, name in _matrices(model, targets):
        shape = module._parameters[name].shape
        copies = shape[0] if len(shape) == 3 else 1
        rows, columns = shape[-2:]
        r = min(rows, columns)
        trainable += copies * r
        frozen += copies * r * (rows + columns + 1)
    return trainable, frozen


@contextlib.contextmanager
def merged(model: nn.Module):
    """Within the block, ``model`` is a plain policy: every targeted weight holds ``W'`` and the SVF parameters
    are gone from its modules (``named_parameters`` and ``state_dict`` are the base model's). The weights and
    vectors are restored exactly after. For export and for weight sync to an inference engine."""
    if not has_svf(model):
        yield model
        return
    targets = model.svf_targets
    saved = []
    with torch.no_grad():
        for _, module, name in _matrices(model, targets):
            weight = module._parameters[name]
            original = weight.data.clone()
            work = torch.promote_types(weight.dtype, torch.float32)  # float64 weights merge in float64
            weight.data.copy_((weight.to(work) + _delta(module, name).to(work)).to(weight.dtype))
            extra = {part: module._parameters.pop(_suffix(name, part)) for part in (*FACTORS, "dz")}
            module._svf_merged = True
            saved.append((module, name, original, extra))
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, name, original, extra in saved:
                module._parameters[name].data.copy_(original)
                for part, parameter in extra.items():
                    module._parameters[_suffix(name, part)] = parameter
                module._svf_merged = False


def svf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vectors (and trained routers) of ``model``, whole and on the CPU: what :func:`save_svf` writes. Under
    DeepSpeed ZeRO-3 they are gathered, a collective: every rank must call this."""
    routers = _trained_routers(model)
    wanted = lambda name: name.endswith("_svf_dz") or name.startswith(routers)  # noqa: E731
    with gathered([p for n, p in model.named_parameters() if wanted(n)]):
        return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if wanted(n)}


def save_svf(model: nn.Module, directory: str | Path, state_dict: dict | None = None) -> None:
    """The vectors (and trained routers) of ``model`` and how to rebuild them, in ``directory``: what
    :func:`load_svf` reads back onto the base policy. ``state_dict``: from :func:`svf_state` (or the model's
    whole state dict), when a caller gathered it (ZeRO-3); else read here."""
    from safetensors.torch import save_file

    directory = Path(directory)
    routers = _trained_routers(model)
    if state_dict is None:
        state_dict = svf_state(model)
    vectors = {n: t.detach().cpu().float().contiguous() for n, t in state_dict.items() if n.endswith("_svf_dz")}
    if not vectors:  # e.g. the empty state dict transformers passes under ZeRO-3 without 16-bit gathering
        raise ValueError(
            "save_svf: the state dict holds no SVF vectors; under DeepSpeed ZeRO-3 gather them on every rank with "
            "rlvr.tuning.svf.svf_state(model) and pass that"
        )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(vectors, str(directory / VECTORS_FILE))
    if routers:
        router_state = {n: t.detach().cpu().contiguous() for n, t in state_dict.items() if n.startswith(routers)}
        save_file(router_state, str(directory / ROUTERS_FILE))
    base = getattr(getattr(model, "config", None), "_name_or_path", "")
    meta = {"method": "svf", "base_model_name_or_path": base, **asdict(model.svf_config)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _trained_routers(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the routers an SVF policy trains as full parameters (none when they are frozen)."""
    config: SVFConfig = model.svf_config
    return tuple(f"{path}." for path in model.svf_targets.routers) if config.routers == "train" else ()


def is_svf_directory(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_svf(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the SVF of ``directory`` (written by :func:`save_svf`) to the base policy ``model`` and load its
    vectors and routers; every saved vector must find its matrix."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    config = SVFConfig(**{field.name: meta[field.name] for field in fields(SVFConfig)})
    if not has_svf(model):
        apply_svf(model, config)
    own = svf_parameters(model)
    vectors = load_file(str(directory / VECTORS_FILE))
    if set(vectors) != set(own):
        missing, unexpected = sorted(set(own) - set(vectors)), sorted(set(vectors) - set(own))
        raise ValueError(
            f"{directory}: SVF vectors do not fit this policy (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad(), gathered(list(own.values()), modifier_rank=0):
        for name, tensor in vectors.items():
            own[name].copy_(tensor)
    if (directory / ROUTERS_FILE).is_file():  # router weights and buffers (DeepSeek-V3's correction bias)
        unexpected = model.load_state_dict(load_file(str(directory / ROUTERS_FILE)), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{directory}: router weights do not fit this policy ({unexpected[:3]})")
    return model
