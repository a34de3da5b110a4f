"""The starting policies of the upcycling experiment (``upcycle.inits`` in a compare config).

Following Branch-Train-MiX (Sukhbaatar et al., 2024, sec. 2): a *seed* dense model (here: a tiny dense
model warm-started on the mixed task) is branched; each branch continues training on one domain for
``upcycle.branch_steps`` supervised steps; the branches are merged into one MoE (``btx``: expert i =
branch i's feed-forward layers, the rest averaged, router from each domain's mean hidden state). The
controls start from the same seed:

* ``sparse``: the seed's feed-forward layer copied into every expert (sparse upcycling, Komatsuzaki
  et al., 2022); with ``upcycle.match_compute`` the seed first trains as many more steps on the mix
  as the branches took together, so that both upcycled MoEs rest on the same supervised compute;
* ``scratch``: a tiny MoE trained from random init on the mixed task.

Every init then gets the same supervised "MoE fine-tuning" on the mix (BTX's last stage; the run's own
warm start, to ``warm_start.target_accuracy``) before RL. Branching needs a shared trained seed: the
averaged attention of branches grown from a random init computes nothing useful (measured: 0.0
accuracy after merging).

Every construction seed (``upcycle.construction_seeds``) builds its own seed dense model, branches and
starting MoEs (and seeds each MoE's fine-tuning on the mix), so that a compare measures how much of a
difference comes from how the MoE happened to be built, not only from RL sampling. Policies are built once
under ``<compare output_dir>/policies/seed<C>/<init>/`` (dense warm starts are cached like any warm
start); ``policies.json`` beside them records the dense warm starts and each built policy's per-domain
routing on the eval solutions before any MoE training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from rlvr.data import generate_problems, make_prompt
from rlvr.models import ARCHITECTURES, DENSE_ARCHITECTURES, load_pretrained
from rlvr.models.upcycle import MANIFEST, upcycle
from rlvr.run.config import RunConfig
from rlvr.run.evaluation import render_prompts
from rlvr.run.recipe import domain_routing, prepare_data, prepare_policy, resolve_rewards
from rlvr.run.warm_start import WarmStartResult
from rlvr.utils.options import option, require, require_integers

POLICIES_DIR = "policies"
INITS = ("btx", "sparse", "scratch")


@dataclass
class UpcycleConfig:
    """The ``upcycle`` config section: the starting policies a compare builds and runs every arm from."""

    inits: list = option(
        [],
        "rlvr compare: starting policies to compare (empty: the model above): btx (branches of a mix-trained "
        "dense seed trained apart per domain, merged), sparse (the seed copied into every expert), scratch (an MoE "
        "from random init); each is fine-tuned on the mix (warm_start) before RL",
    )
    dense_model: str = option(
        "tiny:qwen3", "dense family the btx/sparse experts come from: tiny:qwen3, tiny:mistral or tiny:llama"
    )
    scratch_model: str = option("tiny:qwen3_moe", "MoE architecture of the scratch init (a tiny:<arch> name)")
    num_experts: int = option(2, "experts per MoE layer (btx: one per data.task.domains entry)")
    top_k: int = option(1, "experts per token of every init")
    router_init: str = option(
        "mean_hidden",
        "btx router init: random, zero, mean_hidden (each domain's mean hidden state)",
        ("random", "zero", "mean_hidden"),
    )
    router_samples: int = option(64, "btx mean_hidden: training problems per domain routed through its dense model")
    branch_steps: int = option(
        200, "btx: supervised steps of each branch on its own domain, starting from the mix-trained seed"
    )
    match_compute: bool = option(
        True,
        "sparse: train the seed branch_steps x domains more steps on the mix first (same supervised compute as btx)",
    )
    construction_seeds: list = option(
        [0],
        "rlvr compare: seeds the starting policies are built with (dense seed init and SFT, branches, merge, the "
        "MoEs' fine-tuning on the mix); every init x arm x compare seed runs once per construction seed",
    )
    construction_seed: int | None = option(
        None, "set by rlvr compare on each run: the construction seed of its starting policy (for the report)"
    )

    def validate(self) -> None:
        for index, init in enumerate(self.inits):
            require(init in INITS, f"inits[{index}]", f"must be one of {', '.join(INITS)}; got {init!r}")
        require(len(set(self.inits)) == len(self.inits), "inits", "lists an init twice")
        if not self.inits:
            return
        dense = self.dense_model.removeprefix("tiny:") if self.dense_model.startswith("tiny:") else None
        require(
            dense in DENSE_ARCHITECTURES,
            "dense_model",
            f"must be one of {', '.join('tiny:' + a for a in sorted(DENSE_ARCHITECTURES))}",
        )
        scratch = self.scratch_model.removeprefix("tiny:") if self.scratch_model.startswith("tiny:") else None
        require(
            scratch in ARCHITECTURES,
            "scratch_model",
            f"must be one of {', '.join('tiny:' + a for a in sorted(ARCHITECTURES))}",
        )
        require(1 <= self.top_k <= self.num_experts, "top_k", f"must be in 1..upcycle.num_experts ({self.num_experts})")
        require(self.router_samples >= 1, "router_samples", "must be >= 1")
        require(self.branch_steps >= 1, "branch_steps", "must be >= 1")
        require(len(self.construction_seeds) > 0, "construction_seeds", "needs at least one seed")
        require_integers(self.construction_seeds, "construction_seeds")
        require(
            len(set(self.construction_seeds)) == len(self.construction_seeds),
            "construction_seeds",
            "lists a seed twice",
        )


def construction_directory(output_dir: Path, construction_seed: int) -> Path:
    """Where the starting policies of one construction seed are built (``policies.json`` beside them)."""
    return Path(output_dir) / POLICIES_DIR / f"seed{construction_seed}"


def policy_directory(output_dir: Path, init: str, construction_seed: int) -> Path:
    return construction_directory(output_dir, construction_seed) / init


def construction_overrides(construction_seed: int) -> list[str]:
    """Overrides that build with ``construction_seed``: the tiny inits and every warm start (dense seed,
    branches, the MoEs' fine-tuning on the mix) use it."""
    return [f"warm_start.seed={construction_seed}", f"upcycle.construction_seed={construction_seed}"]


def run_overrides(upcycle_config: UpcycleConfig, output_dir: Path, init: str, construction_seed: int) -> list[str]:
    """Config overrides that make a run start from ``init`` as built with ``construction_seed`` (each is
    fine-tuned on the mix first)."""
    seeded = [*construction_overrides(construction_seed), "warm_start.enabled=true"]
    if init == "scratch":
        return [
            f"model.name_or_path={upcycle_config.scratch_model}",
            f"model.tiny.num_experts={upcycle_config.num_experts}",
            f"model.tiny.top_k={upcycle_config.top_k}",
            *seeded,
        ]
    return [f"model.name_or_path={policy_directory(output_dir, init, construction_seed)}", *seeded]


def _warm_started_dense(
    make_config: Callable[[list[str]], RunConfig],
    base: RunConfig,
    model: str,
    domains: list[str],
    eval_expressions: set[str],
    fixed_steps: int | None = None,
) -> WarmStartResult:
    """``model`` warm-started on ``domains`` (cached; the result's ``path`` holds it).

    ``fixed_steps``: train exactly that many steps (a branch) instead of stopping at the target accuracy.
    """
    # a branch sees as many problems of its domain as the mixed task holds
    num_train = base.data.num_train * len(domains) // len(base.data.task.domains)
    extra = (
        []
        if fixed_steps is None
        else [
            "warm_start.target_accuracy=1.0",
            f"warm_start.max_steps={fixed_steps}",
            f"warm_start.eval_every={fixed_steps}",
        ]
    )
    config = make_config(
        [
            "data.task.domains=[" + ",".join(domains) + "]",
            f"data.num_train={num_train}",
            f"model.name_or_path={model}",
            "warm_start.enabled=true",
            "upcycle.inits=[]",
            *extra,
        ]
    )
    data = prepare_data(config)
    data.eval_expressions = data.eval_expressions | eval_expressions  # dev problems stay out of the RL eval set
    _, _, accuracy_fn = resolve_rewards(config)
    _, _, warm = prepare_policy(config, data, accuracy_fn)
    return warm


def _described(warm: WarmStartResult) -> dict:
    return {"path": str(warm.path), "steps": warm.steps, "dev_accuracy": warm.dev_accuracy}


def build_policies(
    compare_config: Callable[[list[str]], RunConfig],
    settings: UpcycleConfig,
    output_dir: Path,
    construction_seed: int,
    say=print,
) -> dict[str, Path]:
    """Build every ``btx``/``sparse`` policy of ``settings.inits`` for one construction seed, unless built.

    Args:
        compare_config: base config with extra overrides applied (the compare's config files and overrides).
        settings: the compare's ``upcycle`` section.
    """

    def make_config(extra: list[str]) -> RunConfig:
        return compare_config([*construction_overrides(construction_seed), *extra])

    base = make_config([])
    wanted = [init for init in settings.inits if init in ("btx", "sparse")]
    built = {init: policy_directory(output_dir, init, construction_seed) for init in wanted}
    todo = [init for init in wanted if not (built[init] / MANIFEST).exists()]
    if not todo:
        return built
    say(f"[upcycle] construction seed {construction_seed}")
    data = prepare_data(base)
    record_path = construction_directory(output_dir, construction_seed) / "policies.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    domains = list(base.data.task.domains)
    say(f"[upcycle] seed: warm-starting the dense {settings.dense_model} on the mix ({', '.join(domains)})")
    warm = _warm_started_dense(make_config, base, settings.dense_model, domains, data.eval_expressions)
    seed = warm.path
    record["dense_seed (mix)"] = _described(warm)
    if "btx" in todo:
        branches, samples = [], []
        for domain in domains:
            say(f"[upcycle] btx: branch {domain}: {settings.branch_steps} more steps of the seed on {domain} only")
            warm = _warm_started_dense(
                make_config, base, str(seed), [domain], data.eval_expressions, settings.branch_steps
            )
            record[f"branch_{domain}"] = _described(warm)
            branches.append(warm.path)
            task = make_config([f"data.task.domains=[{domain}]", "upcycle.inits=[]"]).data.task
            problems = generate_problems(task, "train", settings.router_samples, base.data_seed())
            prompts = [make_prompt(p.question, base.data.system_prompt, base.data.chat) for p in problems]
            rendered = render_prompts(AutoTokenizer.from_pretrained(warm.path), prompts)
            samples.append([prompt + p.solution for prompt, p in zip(rendered, problems, strict=True)])
        say(f"[upcycle] btx: merging {len(branches)} branches -> {built['btx']}")
        upcycle(
            branches,
            built["btx"],
            method="btx",
            top_k=settings.top_k,
            router_init=settings.router_init,
            router_samples=samples if settings.router_init == "mean_hidden" else None,
            seed=base.warm_start_seed(),
            overwrite=True,
        )
    if "sparse" in todo:
        source = seed
        if settings.match_compute:  # as many supervised steps as the btx branches took together
            steps = settings.branch_steps * len(domains)
            say(f"[upcycle] sparse: {steps} more steps of the seed on the mix (compute matched to the btx branches)")
            warm = _warm_started_dense(make_config, base, str(seed), domains, data.eval_expressions, steps)
            source = warm.path
            record["seed_continued (mix)"] = _described(warm)
        say(
            f"[upcycle] sparse: copying the dense feed-forward layers into {settings.num_experts} experts "
            f"-> {built['sparse']}"
        )
        upcycle(
            [source],
            built["sparse"],
            method="sparse",
            num_experts=settings.num_experts,
            top_k=settings.top_k,
            router_init="random" if settings.router_init == "mean_hidden" else settings.router_init,
            seed=base.warm_start_seed(),
            overwrite=True,
        )
    for init in todo:  # routing of the built MoE before any MoE training
        model, tokenizer = load_pretrained(str(built[init]))
        record[f"routing_{init}_as_built"] = domain_routing(base, model, tokenizer, data)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    return built
