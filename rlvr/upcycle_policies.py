"""The starting policies of the upcycling experiment (``upcycle.inits`` in a compare config).

Following Branch-Train-MiX (Sukhbaatar et al., 2024): one seed dense model is branched, each branch is
trained on one domain of the embedded task (supervised warm start), and the branches are merged into
one MoE (``btx``: expert i = branch i's feed-forward layers, the rest averaged, router from each
domain's mean hidden state). The controls start from the same seed model and data:

* ``sparse``: the seed trained on the mixed task, its feed-forward layer copied into every expert
  (sparse upcycling, Komatsuzaki et al., 2022);
* ``scratch``: a tiny MoE warm-started on the mixed task.

Policies are built once under ``<compare output_dir>/policies/<init>/`` (dense warm starts are cached
like any warm start) and ``policies/policies.json`` records how each was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rlvr.config import RunConfig
from rlvr.data import generate_problems, make_prompt
from rlvr.upcycle import MANIFEST, upcycle

POLICIES_DIR = "policies"


def policy_directory(output_dir: Path, init: str) -> Path:
    return Path(output_dir) / POLICIES_DIR / init


def run_overrides(config: RunConfig, output_dir: Path, init: str) -> list[str]:
    """Config overrides that make a run start from ``init``."""
    upcycle_config = config.upcycle
    if init == "scratch":
        return [
            f"model.name_or_path={upcycle_config.scratch_model}", f"model.tiny.num_experts={upcycle_config.num_experts}",
            f"model.tiny.top_k={upcycle_config.top_k}", "warm_start.enabled=true",
        ]
    return [f"model.name_or_path={policy_directory(output_dir, init)}", "warm_start.enabled=false"]


def _warm_started_dense(make_config: Callable[[list[str]], RunConfig], domains: list[str], eval_expressions: set[str]):
    """The seed dense model warm-started on ``domains`` (cached); returns (path, warm-start result)."""
    from rlvr.recipe import prepare_data, prepare_policy, resolve_rewards

    base = make_config([])
    # a branch sees as many problems of its domain as the mixed task holds
    num_train = base.data.num_train * len(domains) // len(base.data.task.domains)
    config = make_config([
        "data.task.domains=[" + ",".join(domains) + "]", f"data.num_train={num_train}",
        f"model.name_or_path={base.upcycle.dense_model}", "warm_start.enabled=true", "upcycle.inits=[]",
    ])
    data = prepare_data(config)
    data.eval_expressions = data.eval_expressions | eval_expressions  # dev problems stay out of the RL eval set
    _, _, accuracy_fn = resolve_rewards(config)
    _, _, warm = prepare_policy(config, data, accuracy_fn)
    return warm.path, warm


def build_policies(make_config: Callable[[list[str]], RunConfig], output_dir: Path, say=print) -> dict[str, Path]:
    """Build every ``btx``/``sparse`` policy of ``upcycle.inits`` that is not built yet.

    Args:
        make_config: base config with extra overrides applied (the compare's config files and overrides).
    """
    from rlvr.models import load_pretrained
    from rlvr.recipe import prepare_data

    base = make_config([])
    settings = base.upcycle
    wanted = [init for init in settings.inits if init in ("btx", "sparse")]
    built = {init: policy_directory(output_dir, init) for init in wanted}
    todo = [init for init in wanted if not (built[init] / MANIFEST).exists()]
    if not todo:
        return built
    mixed_eval = prepare_data(base).eval_expressions
    record_path = Path(output_dir) / POLICIES_DIR / "policies.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    domains = list(base.data.task.domains)
    if "btx" in todo:
        dense_paths, samples = [], []
        for domain in domains:
            say(f"[upcycle] btx: warm-starting the dense {settings.dense_model} on {domain}")
            path, warm = _warm_started_dense(make_config, [domain], mixed_eval)
            record[f"dense_{domain}"] = {"path": str(path), "steps": warm.steps, "dev_accuracy": warm.dev_accuracy}
            dense_paths.append(path)
            _, tokenizer = load_pretrained(str(path))
            task = make_config([f"data.task.domains=[{domain}]", "upcycle.inits=[]"]).data.task
            problems = generate_problems(task, "train", settings.router_samples, base.data_seed())
            samples.append([
                tokenizer.apply_chat_template(make_prompt(p.question, base.data.system_prompt, True), tokenize=False,
                                              add_generation_prompt=True) + p.solution
                if base.data.chat else make_prompt(p.question, base.data.system_prompt, False) + p.solution
                for p in problems
            ])
        say(f"[upcycle] btx: merging {len(dense_paths)} dense models -> {built['btx']}")
        upcycle(dense_paths, built["btx"], method="btx", top_k=settings.top_k, router_init=settings.router_init,
                router_samples=samples if settings.router_init == "mean_hidden" else None, seed=base.warm_start_seed(),
                overwrite=True)
    if "sparse" in todo:
        say(f"[upcycle] sparse: warm-starting the dense {settings.dense_model} on the mix ({', '.join(domains)})")
        path, warm = _warm_started_dense(make_config, domains, mixed_eval)
        record["dense_mix"] = {"path": str(path), "steps": warm.steps, "dev_accuracy": warm.dev_accuracy}
        say(f"[upcycle] sparse: copying its feed-forward layers into {settings.num_experts} experts -> {built['sparse']}")
        upcycle([path], built["sparse"], method="sparse", num_experts=settings.num_experts, top_k=settings.top_k,
                router_init="random" if settings.router_init == "mean_hidden" else settings.router_init,
                seed=base.warm_start_seed(), overwrite=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return built
