"""Parity of adv_chain optimizers against independent reference implementations.

Oracles: ``torch.optim.{AdamW, Adam, SGD}``, ``torch.nn.utils.clip_grad_norm_`` and lion-pytorch's
``Lion``. Every test trains two identical copies of a small MLP (two hidden layers and a LayerNorm,
deterministic data) in lockstep, one with the oracle and one with adv_chain, for at least 100 steps
(most under an LR scheduler), and compares every parameter after every step: the max abs difference
must stay <= 1e-5 (fp32); the first step that diverges is reported.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import pytest
import torch
from lion_pytorch import Lion as RefLion

import adv_chain as ac

STEPS = 100
ATOL = 1e-5
IN, HIDDEN, OUT = 10, 24, 3


# -- helpers -----------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    """Linear -> LayerNorm -> Tanh -> Linear -> GELU -> Linear, plus two optional extras:
    ``sometimes`` (a bias used only on some steps: its grad is None on the others) and ``late``
    (a head only used once it joins the optimizer through ``add_param_group``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = torch.nn.Linear(HIDDEN, OUT)
        self.sometimes = torch.nn.Parameter(torch.zeros(OUT))
        self.late = torch.nn.Linear(HIDDEN, OUT)
        self.use_sometimes = False
        self.use_late = False

    def core(self) -> list[torch.nn.Parameter]:
        """Parameters always used in the forward pass."""
        return [p for m in (self.fc1, self.norm, self.fc2, self.fc3) for p in m.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.fc2(torch.tanh(self.norm(self.fc1(x)))))
        out = self.fc3(h)
        if self.use_sometimes:
            out = out + self.sometimes
        if self.use_late:
            out = out + self.late(h)
        return out


def make_model() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        model.norm.weight.add_(0.1 * torch.randn(HIDDEN))
        model.norm.bias.add_(0.1 * torch.randn(HIDDEN))
    return model


_GEN = torch.Generator().manual_seed(1234)
_X = torch.randn(8, 32, IN, generator=_GEN)
_W = torch.randn(IN, OUT, generator=_GEN)
_Y = torch.sin(_X @ _W) + 0.1 * torch.randn(8, 32, OUT, generator=_GEN)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch (8 fixed batches, cycled)."""
    return _X[step % 8], _Y[step % 8]


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    """Largest abs difference over all parameters (inf if either side is not finite) and where."""
    worst, where = 0.0, ""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not (torch.isfinite(pa).all() and torch.isfinite(pb).all()):
            return math.inf, name
        d = (pa.detach() - pb.detach()).abs().max().item()
        if d > worst:
            worst, where = d, name
    return worst, where


def lockstep(make_ref: Callable[[MLP], torch.optim.Optimizer], make_ours: Callable[[MLP], torch.optim.Optimizer], *,
             sched: Callable[[torch.optim.Optimizer], Any] | None = None, steps: int = STEPS,
             before: Callable[[int, MLP, torch.optim.Optimizer], None] | None = None,
             ref_pre_step: Callable[[MLP], Any] | None = None,
             check: Callable[[int, Any, torch.optim.Optimizer], None] | None = None,
             loss_scale: float = 1.0, atol: float = ATOL) -> tuple[MLP, MLP]:
    """Train identical model copies with the oracle (``make_ref``) and adv_chain (``make_ours``) in
    lockstep; fail at the first step after which any parameter differs by more than ``atol``.

    ``before(step, model, opt)`` runs on both sides before the forward pass (e.g. to add a param
    group); ``ref_pre_step(ref_model)`` runs on the oracle side between backward and ``step`` (e.g.
    ``clip_grad_norm_``) and its result goes to ``check(step, result, our_opt)`` after the steps.
    The objective is ``loss_scale * MSE``: ``-1`` for ``maximize=True`` keeps gradient ascent bounded.
    """
    ref_model = make_model()
    our_model = copy.deepcopy(ref_model)
    init = copy.deepcopy(ref_model)
    ref_opt, our_opt = make_ref(ref_model), make_ours(our_model)
    assert isinstance(our_opt, ac.ChainOptimizer)
    scheds = [sched(ref_opt), sched(our_opt)] if sched is not None else []
    for step in range(steps):
        x, y = batch(step)
        for model, opt in ((ref_model, ref_opt), (our_model, our_opt)):
            if before is not None:
                before(step, model, opt)
            opt.zero_grad(set_to_none=True)
            (loss_scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        info = ref_pre_step(ref_model) if ref_pre_step is not None else None
        ref_opt.step()
        our_opt.step()
        if check is not None:
            check(step, info, our_opt)
        for s in scheds:
            s.step()
        diff, name = max_param_diff(ref_model, our_model)
        if not diff <= atol:
            pytest.fail(f"diverged from the oracle at step {step}: parameter {name!r} differs by {diff:.3e} "
                        f"(> {atol:g})")
    moved, _ = max_param_diff(init, our_model)
    assert moved > 1e-3, "the parameters barely moved: the comparison would be vacuous"
    return ref_model, our_model


def sign(kw: dict[str, Any]) -> float:
    """Loss scale for optimizer keywords: maximize=True ascends on -MSE (which descends on MSE)."""
    return -1.0 if kw.get("maximize", False) else 1.0


# schedulers (each is built for the oracle and for adv_chain alike)
def one_cycle(max_lr: float) -> Callable[[torch.optim.Optimizer], Any]:
    """OneCycleLR: changes lr at every step and cycles ``betas[0]`` / ``momentum`` as well."""
    return lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=STEPS)


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.3)


def lambda_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))


def make_sched(kind: str, max_lr: float) -> Callable[[torch.optim.Optimizer], Any] | None:
    """A scheduler factory by name: "onecycle" (peaks at ``max_lr``), "steplr", "lambdalr" or "none"."""
    return {"onecycle": one_cycle(max_lr), "steplr": step_lr, "lambdalr": lambda_lr, "none": None}[kind]


def params_of(model: MLP) -> list[torch.nn.Parameter]:
    return model.core()


# -- AdamW ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "steplr", "none"])
@pytest.mark.parametrize("kw", [
    dict(weight_decay=0.1),
    dict(weight_decay=0.05, amsgrad=True),
    dict(weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.1, amsgrad=True, maximize=True),
], ids=["wd", "amsgrad", "betas_eps", "maximize", "amsgrad_maximize"])
def test_adamw_matches_torch(kw, sched):
    """Oracle: torch.optim.AdamW with the same keywords and scheduler."""
    lr = 3e-3
    lockstep(lambda m: torch.optim.AdamW(params_of(m), lr=lr, **kw),
             lambda m: ac.optim.AdamW(params_of(m), lr=lr, **kw), sched=make_sched(sched, lr),
             loss_scale=sign(kw))


# -- Adam ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "lambdalr"])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(weight_decay=0.01),
    dict(weight_decay=0.01, amsgrad=True),
    dict(weight_decay=0.01, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True),
], ids=["plain", "l2", "l2_amsgrad", "l2_maximize", "decoupled", "decoupled_amsgrad_maximize"])
def test_adam_matches_torch(kw, sched):
    """Oracle: torch.optim.Adam (coupled L2 decay; decoupled_weight_decay=True is AdamW)."""
    lr = 3e-3
    lockstep(lambda m: torch.optim.Adam(params_of(m), lr=lr, **kw),
             lambda m: ac.optim.Adam(params_of(m), lr=lr, **kw), sched=make_sched(sched, lr),
             loss_scale=sign(kw))


# -- SGD -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "steplr"])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
    dict(weight_decay=1e-2, maximize=True),
], ids=["plain", "momentum", "nesterov", "dampening", "momentum_wd", "nesterov_wd_maximize", "wd_maximize"])
def test_sgd_matches_torch(kw, sched):
    """Oracle: torch.optim.SGD. (With OneCycleLR and momentum=0 at construction, the scheduler
    turns momentum on: torch then keeps a momentum buffer, and so must adv_chain.)"""
    lr = 2e-2
    lockstep(lambda m: torch.optim.SGD(params_of(m), lr=lr, **kw),
             lambda m: ac.optim.SGD(params_of(m), lr=lr, **kw), sched=make_sched(sched, lr),
             loss_scale=sign(kw))


# -- Lion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "lambdalr", "none"])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.5, betas=(0.95, 0.98)),
    dict(weight_decay=1e-3, decoupled_weight_decay=True),
], ids=["plain", "wd", "wd_betas", "decoupled_wd"])
def test_lion_matches_lion_pytorch(kw, sched):
    """Oracle: lion_pytorch.Lion (decoupled_weight_decay=True divides the decay by the initial lr)."""
    lr = 1e-3
    lockstep(lambda m: RefLion(params_of(m), lr=lr, **kw),
             lambda m: ac.optim.Lion(params_of(m), lr=lr, **kw), sched=make_sched(sched, lr),
             loss_scale=sign(kw))


# -- by name and hand-built ----------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "steplr"])
def test_chain_optimizer_by_name_matches_torch_adamw(sched):
    """Oracle: torch.optim.AdamW; ours: ChainOptimizer(params, "adamw", ...)."""
    lr = 3e-3
    lockstep(lambda m: torch.optim.AdamW(params_of(m), lr=lr, weight_decay=0.05),
             lambda m: ac.ChainOptimizer(params_of(m), "adamw", lr=lr, weight_decay=0.05),
             sched=make_sched(sched, lr))


@pytest.mark.parametrize("sched", ["onecycle", "steplr"])
def test_hand_built_chain_matches_torch_adamw(sched):
    """Oracle: torch.optim.AdamW; ours: chain(scale_by_adam, eps_divide, weight_decay, apply)."""
    lr = 3e-3
    chain = ac.chain(ac.scale_by_adam(betas=(0.9, 0.99)), ac.eps_divide(1e-7), ac.weight_decay(0.05), ac.apply())
    lockstep(lambda m: torch.optim.AdamW(params_of(m), lr=lr, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05),
             lambda m: ac.ChainOptimizer(params_of(m), chain, lr=lr), sched=make_sched(sched, lr))


# -- param groups --------------------------------------------------------------------------------
def two_groups(model: MLP, first: dict[str, Any] | None = None, second: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """Two param groups with different ``lr`` and ``weight_decay``, plus any extra group keys."""
    return [{"params": [*model.fc1.parameters(), *model.norm.parameters()], "lr": 4e-3, "weight_decay": 0.2,
             **(first or {})},
            {"params": [*model.fc2.parameters(), *model.fc3.parameters()], "lr": 1e-3, "weight_decay": 0.0,
             **(second or {})}]


@pytest.mark.parametrize("sched", ["lambdalr", "steplr"])
def test_param_groups_namespaced_betas_match_torch(sched):
    """Oracle: torch.optim.AdamW with the same two groups; the second group's betas are torch's plain
    ``betas`` key vs adv_chain's namespaced ``"adam.betas"``; the first group also overrides ``eps``."""
    lockstep(lambda m: torch.optim.AdamW(two_groups(m, {"eps": 1e-4}, {"betas": (0.8, 0.99)}), lr=1e-2),
             lambda m: ac.optim.AdamW(two_groups(m, {"eps": 1e-4}, {"adam.betas": (0.8, 0.99)}), lr=1e-2),
             sched=make_sched(sched, 1e-2))


@pytest.mark.parametrize("make_ref, make_ours", [
    (lambda gs: torch.optim.AdamW(gs, lr=1e-2), lambda gs: ac.ChainOptimizer(gs, "adamw", lr=1e-2)),
    (lambda gs: torch.optim.Adam(gs, lr=1e-2, amsgrad=True), lambda gs: ac.optim.Adam(gs, lr=1e-2, amsgrad=True)),
], ids=["adamw_by_name", "adam_amsgrad"])
def test_param_groups_plain_betas_match_torch(make_ref, make_ours):
    """Oracle: torch.optim.AdamW/Adam; both sides use the plain group key ``betas`` (and OneCycleLR
    on a two-group optimizer cycles each group's betas)."""
    lockstep(lambda m: make_ref(two_groups(m, second={"betas": (0.8, 0.99)})),
             lambda m: make_ours(two_groups(m, second={"betas": (0.8, 0.99)})), sched=one_cycle(1e-2))


@pytest.mark.parametrize("key", ["momentum", "momentum.momentum"])
def test_param_groups_sgd_match_torch(key):
    """Oracle: torch.optim.SGD with two groups (lr, weight_decay; the second also its own momentum
    and nesterov); adv_chain gets the momentum as the plain key or the namespaced one."""
    lockstep(lambda m: torch.optim.SGD(two_groups(m, second={"momentum": 0.5, "nesterov": True}), lr=2e-2,
                                       momentum=0.9),
             lambda m: ac.optim.SGD(two_groups(m, second={key: 0.5, "nesterov": True}), lr=2e-2, momentum=0.9),
             sched=step_lr)


def test_param_groups_lion_match_lion_pytorch():
    """Oracle: lion_pytorch.Lion with two groups (lr, weight_decay, betas in the second)."""
    lockstep(lambda m: RefLion(two_groups(m, second={"betas": (0.95, 0.98)}), lr=1e-3),
             lambda m: ac.optim.Lion(two_groups(m, second={"lion.betas": (0.95, 0.98)}), lr=1e-3),
             sched=lambda_lr)


@pytest.mark.parametrize("ref_cls, our_cls", [
    (torch.optim.Adam, ac.optim.Adam),
    (torch.optim.AdamW, ac.optim.AdamW),
], ids=["adam", "adamw"])
def test_per_group_amsgrad_matches_torch(ref_cls, our_cls):
    """Oracle: torch's optimizer, which reads ``amsgrad`` from each param group (a group may turn it
    on while the defaults have it off). A drop-in must honor it too."""
    lockstep(lambda m: ref_cls(two_groups(m, second={"amsgrad": True}), lr=1e-2),
             lambda m: our_cls(two_groups(m, second={"amsgrad": True}), lr=1e-2))


@pytest.mark.parametrize("our_cls", [ac.optim.SGD, ac.optim.Adam, ac.optim.AdamW])
def test_per_group_maximize_is_refused_not_ignored(our_cls):
    """torch reads ``maximize`` per group; a chain fixes the direction when it is built, so a group
    asking for the other direction is an error naming the key (never silently ignored)."""
    with pytest.raises(ValueError, match="maximize"):
        our_cls(two_groups(make_model(), second={"maximize": True}), lr=1e-2)
    our_cls(two_groups(make_model(), second={"maximize": False}), lr=1e-2)  # agreeing groups are fine


@pytest.mark.parametrize("make_ref, make_ours", [
    (lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1), lambda ps: ac.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)),
    (lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.9), lambda ps: ac.optim.SGD(ps, lr=2e-2, momentum=0.9)),
], ids=["adamw", "sgd_momentum"])
def test_add_param_group_mid_training_matches_torch(make_ref, make_ours):
    """Oracle: torch's optimizer given the same ``add_param_group`` (own lr and weight_decay) at
    step 40; the new head only enters the forward pass from then on."""
    def before(step: int, model: MLP, opt: torch.optim.Optimizer) -> None:
        if step == 40:
            opt.add_param_group({"params": list(model.late.parameters()), "lr": 5e-3, "weight_decay": 0.02})
            model.use_late = True

    # no scheduler: torch's schedulers reject a param group added after their construction
    ref, ours = lockstep(lambda m: make_ref(params_of(m)), lambda m: make_ours(params_of(m)), before=before)
    assert not torch.equal(ours.late.weight, make_model().late.weight), "the late group was never trained"


@pytest.mark.parametrize("make_ref, make_ours", [
    (lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1), lambda ps: ac.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)),
    (lambda ps: torch.optim.Adam(ps, lr=3e-3, weight_decay=0.01, amsgrad=True),
     lambda ps: ac.optim.Adam(ps, lr=3e-3, weight_decay=0.01, amsgrad=True)),
    (lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.9, nesterov=True),
     lambda ps: ac.optim.SGD(ps, lr=2e-2, momentum=0.9, nesterov=True)),
    (lambda ps: RefLion(ps, lr=1e-3, weight_decay=0.1), lambda ps: ac.optim.Lion(ps, lr=1e-3, weight_decay=0.1)),
], ids=["adamw", "adam_amsgrad", "sgd_nesterov", "lion"])
def test_param_with_none_grad_on_some_steps_matches_torch(make_ref, make_ours):
    """Oracle: torch/lion-pytorch, which skip a parameter whose grad is None (no step count, no
    decay, no momentum update). ``sometimes`` is used on steps 3..9 and every third step after."""
    used = [3 <= step < 10 or (step > 10 and step % 3 == 0) for step in range(STEPS)]

    def before(step: int, model: MLP, opt: torch.optim.Optimizer) -> None:
        model.use_sometimes = used[step]

    def make(factory):
        return lambda m: factory([*params_of(m), m.sometimes])

    built = {}

    def make_ours_kept(m: MLP) -> torch.optim.Optimizer:
        built["opt"] = make(make_ours)(m)
        return built["opt"]

    _, ours = lockstep(make(make_ref), make_ours_kept, before=before, sched=lambda_lr)
    assert ours.sometimes.abs().max() > 0, "the sometimes-used parameter was never trained"
    assert int(built["opt"].state[ours.sometimes]["step"]) == sum(used), "steps with grad None were counted"


# -- clipping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["onecycle", "none"])
def test_clip_by_global_norm_matches_clip_grad_norm(sched):
    """Oracle: torch.nn.utils.clip_grad_norm_(params, 0.5) then torch.optim.AdamW; the total norm
    adv_chain reports in step_info must equal what clip_grad_norm_ returns."""
    lr = 3e-3
    chain = ac.chain(ac.clip_by_global_norm(0.5), ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01),
                     ac.apply())
    clipped = []

    def ref_pre_step(model: MLP) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params_of(model), 0.5)

    def check(step: int, ref_norm: torch.Tensor, opt: ac.ChainOptimizer) -> None:
        ours = opt.step_info["clip_by_global_norm"]["total_norm"]
        torch.testing.assert_close(ours.float(), ref_norm.float(), rtol=1e-6, atol=0,
                                   msg=lambda m: f"step {step}: total_norm differs: {m}")
        clipped.append(ref_norm.item() > 0.5)

    lockstep(lambda m: torch.optim.AdamW(params_of(m), lr=lr, weight_decay=0.01),
             lambda m: ac.ChainOptimizer(params_of(m), chain, lr=lr), sched=make_sched(sched, lr),
             ref_pre_step=ref_pre_step, check=check, loss_scale=1.7)  # grad norms ~0.4-0.6
    assert any(clipped) and not all(clipped), "clipping should be active on some steps and not on others"


def test_clip_by_global_norm_does_not_write_user_grads():
    """Oracle: the gradient autograd produced; clipping happens inside the step on a copy."""
    model = make_model()
    opt = ac.ChainOptimizer(params_of(model), ac.chain(ac.clip_by_global_norm(1e-3), ac.scale_by_adam(),
                                                       ac.eps_divide(), ac.apply()), lr=1e-3)
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = [p.grad.clone() for p in params_of(model)]
    opt.step()
    for g, p in zip(before, params_of(model)):
        assert torch.equal(g, p.grad)


# -- memory layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("make_ref, make_ours", [
    (lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1), lambda ps: ac.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)),
    (lambda ps: torch.optim.SGD(ps, lr=2e-2, momentum=0.9), lambda ps: ac.optim.SGD(ps, lr=2e-2, momentum=0.9)),
], ids=["adamw", "sgd_momentum"])
def test_channels_last_conv_matches_torch(make_ref, make_ours):
    """Oracle: torch's optimizer on a conv net in ``channels_last`` (non-contiguous, dense weights;
    the documented stride handling of adv_chain must cope with them), 100 steps, 1e-5."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3))
    ref = ref.to(memory_format=torch.channels_last)
    assert not ref[0].weight.is_contiguous()
    ours = copy.deepcopy(ref)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(memory_format=torch.channels_last)
    ref_opt, our_opt = make_ref(list(ref.parameters())), make_ours(list(ours.parameters()))
    for step in range(STEPS):
        for model, opt in ((ref, ref_opt), (ours, our_opt)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        diff, name = max_param_diff(ref, ours)
        assert diff <= ATOL, f"diverged from the oracle at step {step}: parameter {name!r} differs by {diff:.3e}"
