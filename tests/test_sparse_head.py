"""The LM head on forking tokens only (rlvr.training.sparse_head) against a plain float64 reference."""

import contextlib

import pytest
import torch

from rlvr.training import sparse_head
from rlvr.training.sparse_head import HeadTransform, SelectedLogProbs, logprobs_and_entropy, sparse_completion_logprobs


def reference(hidden, weight, bias, targets, transform):
    """Full logits through plain autograd: (N,) log-probs and entropies."""
    z = (hidden @ weight.t() + (0 if bias is None else bias)) * transform.logit_scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    logits = z / transform.temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), entropy


TRANSFORMS = [
    HeadTransform(),
    HeadTransform(0.7, 30.0, 0.5),
    HeadTransform(1.3, None, 2.0),
    HeadTransform(1.0, 5.0, 1.0),
]


def head(vocab=37, size=8, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(size, vocab, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(vocab, size, generator=generator, dtype=torch.float64))
        if bias:
            linear.bias.copy_(torch.randn(vocab, generator=generator, dtype=torch.float64))
    return linear


def close(a, b, rtol=1e-10):
    scale = b.abs().max().clamp(min=1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_the_float64_reference(transform, bias, monkeypatch):
    monkeypatch.setattr(sparse_head, "TILE_ELEMENTS", 37 * 3)  # several row chunks
    linear = head(bias=bias)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (11,), generator=generator)
    upstream = torch.randn(11, generator=generator, dtype=torch.float64)

    logps, entropy = logprobs_and_entropy(hidden, linear.weight, linear.bias, targets, transform)
    want_logps, want_entropy = reference(hidden, linear.weight, linear.bias, targets, transform)
    close(logps, want_logps.detach())
    close(entropy, want_entropy.detach())

    got = SelectedLogProbs.apply(hidden, linear.weight, linear.bias, targets, transform, contextlib.nullcontext)
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, *linear.parameters()])
    want = torch.autograd.grad((want_logps * upstream).sum(), [hidden, *linear.parameters()])
    close(got.detach(), want_logps.detach())
    for g, w in zip(grads, want, strict=True):
        close(g, w)


@pytest.mark.parametrize("rho", [0.05, 0.2, 1.0])
def test_completion_gradients_equal_a_dense_head_with_zero_weights_on_dropped_tokens(rho):
    """The loss TRL computes -- sum of weight x log-prob over every scored token, the weight 0 off the
    selection -- has the same parameter gradients through the sparse head as through the full one."""
    linear = head(vocab=53, size=6)
    generator = torch.Generator().manual_seed(2)
    B, T = 4, 7
    hidden = torch.randn(B, T, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (B, T), generator=generator)
    labels[0, 5:] = -100  # padding
    labels[3, 1:] = -100  # a one-token completion
    weights = torch.rand(B, T, generator=generator, dtype=torch.float64)
    transform = HeadTransform(0.9, 20.0, 1.0)

    def select(entropy):  # the top ceil(rho * n) entropies of the scored tokens
        scored = labels != -100
        k = int(torch.ceil(torch.tensor(rho * scored.sum().item())).item())
        order = torch.where(scored, entropy, torch.full_like(entropy, -1.0)).flatten().argsort(descending=True)
        keep = torch.zeros(B * T, dtype=torch.bool)
        keep[order[:k]] = True
        return keep.view(B, T) & scored

    logps, entropy = sparse_completion_logprobs(hidden, labels, linear, transform, select)
    keep = select(entropy)
    loss = (logps * weights * keep).sum()
    grads = torch.autograd.grad(loss, [hidden, *linear.parameters()])

    scored = labels != -100
    want_logps, want_entropy = reference(hidden[scored], linear.weight, linear.bias, labels[scored], transform)
    full = torch.zeros(B, T, dtype=torch.float64).masked_scatter(scored, want_logps)
    want = torch.autograd.grad((full * weights * keep).sum(), [hidden, *linear.parameters()])
    close(entropy[scored], want_entropy.detach())
    close(logps.detach()[scored], want_logps.detach())
    for g, w in zip(grads, want, strict=True):
        close(g, w)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("rho", [0.05, 0.2, 1.0])
def test_the_fused_kernel_path_matches_the_float64_reference(transform, rho):
    """kernel="trl": both passes through TRL's ChunkedLogProbFunction (its torch fallback here, the code the
    CUDA path runs around the Triton kernel): values and gradients of the selected rows against plain float64
    autograd, to TRL's float32 statistics; padding and one-token rows included."""
    linear = head(vocab=53, size=6)
    generator = torch.Generator().manual_seed(3)
    B, T = 4, 7
    hidden = torch.randn(B, T, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (B, T), generator=generator)
    labels[0, 5:] = -100
    labels[3, 1:] = -100
    weights = torch.rand(B, T, generator=generator, dtype=torch.float64)
    scored = labels != -100
    k = max(1, round(rho * int(scored.sum())))

    def select(entropy):
        order = torch.where(scored, entropy, torch.full_like(entropy, -1.0)).flatten().argsort(descending=True)
        keep = torch.zeros(B * T, dtype=torch.bool)
        keep[order[:k]] = True
        return keep.view(B, T) & scored

    logps, entropy = sparse_completion_logprobs(hidden, labels, linear, transform, select, kernel="trl")
    keep = select(entropy)
    grads = torch.autograd.grad((logps * weights * keep).sum(), [hidden, *linear.parameters()])
    want_logps, want_entropy = reference(hidden[scored], linear.weight, linear.bias, labels[scored], transform)
    full = torch.zeros(B, T, dtype=torch.float64).masked_scatter(scored, want_logps)
    want = torch.autograd.grad((full * weights * keep).sum(), [hidden, *linear.parameters()])
    close(entropy[scored].double(), want_entropy.detach(), rtol=1e-5)
    close(logps.detach()[scored].double(), want_logps.detach(), rtol=1e-5)
    for g, w in zip(grads, want, strict=True):
        close(g, w, rtol=1e-5)


def test_the_kernel_follows_the_device_under_auto():
    assert sparse_head.resolve_kernel("auto", torch.device("cpu")) == "rlvr"
    assert sparse_head.resolve_kernel("auto", torch.device("cuda")) == "trl"
    assert sparse_head.resolve_kernel("trl", torch.device("cpu")) == "trl"
    with pytest.raises(ValueError, match="kernel"):
        sparse_head.resolve_kernel("triton", torch.device("cpu"))


@pytest.mark.parametrize("kernel", ["rlvr", "trl"])
def test_nothing_selected_gives_zero_gradients_not_an_error(kernel):
    linear = head()
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3))
    logps, _ = sparse_completion_logprobs(
        hidden, labels, linear, HeadTransform(), lambda e: torch.zeros_like(e, dtype=torch.bool), kernel=kernel
    )
    logps.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().max() == 0 and linear.weight.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------------
# In the trainer: the sparse loss forward against TRL's fused head and against a float64 reference

LOSS_TYPES = ["grpo", "dapo", "bnpo", "dr_grpo", "cispo", "sapo", "vespo"]


def _trainers(
    tiny_checkpoint, tmp_path, architecture="qwen3_moe", rho=0.2, dtype="float64", moe=None, kernel="auto", **grpo
):
    """(sparse, stock): the same trainer with forking.sparse_lm_head true and false."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_trainer

    made = {}
    for setting in ("true", "false"):
        forking = ForkingConfig(rho=rho, sparse_lm_head=setting, sparse_head_kernel=kernel)
        made[setting] = make_trainer(
            tiny_checkpoint(architecture), tmp_path / setting, forking=forking, moe=moe, dtype=dtype, **grpo
        )
    assert made["true"].sparse_head and not made["false"].sparse_head
    return made["true"], made["false"]


@pytest.mark.parametrize("architecture", ["qwen3_moe", "qwen3"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("rho", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("kernel", ["rlvr", "trl"])
def test_sparse_loss_forward_gives_trls_gradients(tiny_checkpoint, tmp_path, architecture, loss_type, rho, kernel):
    """Same batch, same selection: the parameter gradients of the sparse path equal TRL's fused head's, with
    rlvr's row chunks and with both passes through TRL's fused kernel (its torch fallback on CPU: the CUDA
    path's code). TRL's kernel accumulates in float32 even for a float64 model, which bounds the agreement
    here; the float64 reference test below pins rlvr's path to 1e-10."""
    from tests.test_trainer import loss_and_grads, make_batch

    sparse, stock = _trainers(tiny_checkpoint, tmp_path, architecture, rho, kernel=kernel, loss_type=loss_type)
    batch = make_batch(stock)
    batch["completion_mask"][1, 1:] = 0  # a one-token completion beside the padded ones
    expected_loss, expected_grads = loss_and_grads(stock, batch)
    loss, grads = loss_and_grads(sparse, batch)
    assert expected_loss != 0
    close(loss.double(), expected_loss.double(), rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:  # relative to each tensor's largest entry: float32 accumulation in TRL's kernel
        close(grads[name], expected_grads[name], rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
@pytest.mark.parametrize("rho", [0.05, 0.2, 1.0])
def test_sparse_loss_forward_matches_the_float64_reference_to_1e_10(tiny_checkpoint, tmp_path, loss_type, rho):
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import loss_and_grads, make_batch, make_trainer, reference_loss

    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        forking=ForkingConfig(rho=rho, sparse_lm_head="true"),
        loss_type=loss_type,
        dtype="float64",
    )
    batch = make_batch(trainer)
    loss, grads = loss_and_grads(trainer, batch)
    trainer.model.zero_grad(set_to_none=True)
    expected = reference_loss(trainer, batch, rho, loss_type, "micro_batch")
    expected.backward()
    for name, parameter in trainer.model.named_parameters():
        if parameter.grad is not None:
            close(grads[name], parameter.grad)
    close(loss, expected.detach())


def test_an_empty_selection_trains_nothing_and_does_not_fail(tiny_checkpoint, tmp_path):
    from tests.test_trainer import loss_and_grads, make_batch

    sparse, stock = _trainers(tiny_checkpoint, tmp_path, rho=0.0, loss_type="dapo")
    batch = make_batch(stock)
    for trainer in (sparse, stock):
        loss, grads = loss_and_grads(trainer, batch)
        assert loss == 0 and all(g.abs().max() == 0 for g in grads.values())


def test_sparse_head_is_used_only_where_it_is_exact(tiny_checkpoint, tmp_path):
    from rlvr.forking.selection import ForkingConfig
    from rlvr.utils.options import ConfigError
    from tests.test_trainer import make_trainer

    auto = make_trainer(tiny_checkpoint(), tmp_path / "a", forking=ForkingConfig(rho=0.2))
    assert auto.sparse_head
    for forking, grpo in [
        (ForkingConfig(rho=0.2, policy_tokens="all"), {}),
        (ForkingConfig(rho=0.2), {"beta": 0.04}),
        (ForkingConfig(rho=0.2), {"importance_sampling_level": "sequence"}),
        (ForkingConfig(rho=0.9), {}),
    ]:
        trainer = make_trainer(tiny_checkpoint(), tmp_path / "b", forking=forking, **grpo)
        assert not trainer.sparse_head, (forking, grpo)
    kl_masked = make_trainer(tiny_checkpoint(), tmp_path / "c", forking=ForkingConfig(mask_kl=True), beta=0.04)
    assert kl_masked.sparse_head
    with pytest.raises(ConfigError, match="forking.sparse_lm_head: true, but .*KL penalty"):
        make_trainer(tiny_checkpoint(), tmp_path / "d", forking=ForkingConfig(sparse_lm_head="true"), beta=0.04)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_on_cuda_in_bf16_the_sparse_head_gives_trls_gradients(tiny_checkpoint, tmp_path, loss_type):
    """bf16 autocast on CUDA (TRL's Triton kernel on its side): same loss and gradients up to bf16 rounding."""
    from tests.test_trainer import loss_and_grads, make_batch

    assert torch.cuda.is_available(), "a gpu test: run it on a CUDA machine (scripts/gpu_check.sh)"
    sparse, stock = _trainers(tiny_checkpoint, tmp_path, dtype="float32", loss_type=loss_type, use_cpu=False, bf16=True)
    batch = make_batch(stock)
    expected_loss, expected_grads = loss_and_grads(stock, batch)
    loss, grads = loss_and_grads(sparse, batch)
    close(loss.double(), expected_loss.double(), rtol=2e-2)
    for name in expected_grads:
        close(grads[name].double(), expected_grads[name].double(), rtol=5e-2)


@pytest.mark.parametrize("moe", ["gates", "replay"])
def test_sparse_head_with_gradient_checkpointing_and_router_aware_updates(tiny_checkpoint, tmp_path, moe):
    """Gradient checkpointing re-runs the backbone in backward; router gates and replay still see the
    selection made inside the sparse forward."""
    from rlvr.moe.config import MoEConfig
    from tests.test_trainer import loss_and_grads, make_batch

    settings = (
        MoEConfig(router_gate_scope="forking", expert_gate_scope="forking")
        if moe == "gates"
        else MoEConfig(routing_replay="old_policy")
    )
    sparse, stock = _trainers(
        tiny_checkpoint,
        tmp_path,
        moe=settings,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    batch = make_batch(stock)
    expected_loss, expected_grads = loss_and_grads(stock, batch)
    stock.router_updates.release()
    loss, grads = loss_and_grads(sparse, batch)
    sparse.router_updates.release()
    close(loss.double(), expected_loss.double(), rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        close(grads[name], expected_grads[name], rtol=1e-5)
