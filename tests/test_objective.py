"""Objective: loss, gradient, HVP engines and batched losses against dense float64 ground truth; its guarantees."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from helpers import (
    ALL_CASES,
    Case,
    assert_untouched,
    bn_cnn_case,
    ce_loss,
    dense_hessian,
    snapshot,
    tanh_mlp_case,
)
from lightning_hessian import HvpFallbackWarning, NonFiniteLossError, Objective, extremal_eigenpairs
from lightning_hessian.objective import DetachedLossError, asymmetry, symmetry_tolerance

ENGINES = ["cached", "double_backward", "forward_over_reverse", "finite_difference"]


def _objective(case: Case, **kwargs: object) -> Objective:
    return Objective(case.model, case.loss_fn, case.batches, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("make_case", ALL_CASES)
@pytest.mark.parametrize("engine", ENGINES)
def test_hvp_matches_dense_hessian(make_case, engine: str) -> None:
    case = make_case()
    if engine == "forward_over_reverse" and case.name == "dict_batches":
        pytest.xfail("torch 2.13: torch.func forward-over-reverse through LayerNorm raises (ZeroTensor) or is wrong")
    if engine == "finite_difference" and case.name == "bn_cnn":
        pytest.skip("finite differences cross ReLU/max-pool kinks, which the autograd Hessian ignores (documented)")
    h = dense_hessian(case)
    obj = _objective(case, hvp=engine)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = torch.randn(obj.num_params, generator=gen)
        expected = h @ v.double()
        got = obj.hvp(v).double()
        rel = float((got - expected).norm() / expected.norm())
        # Central differences of float32 gradients keep about 3 digits on smooth models.
        assert rel < (2e-2 if engine == "finite_difference" else 1e-5), rel
    assert obj.n_hvp == 2


@pytest.mark.parametrize("make_case", ALL_CASES)
def test_loss_and_grad_match_full_batch_reference(make_case) -> None:
    case = make_case()
    model = copy.deepcopy(case.model).eval()
    sizes = [len(b["inputs"]) if isinstance(b, dict) else len(b[0]) for b in case.batches]
    losses = [case.loss_fn(model, b) for b in case.batches]
    expected = sum(n * loss for n, loss in zip(sizes, losses)) / sum(sizes)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    obj = _objective(case)
    assert obj.loss() == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(obj.grad(), torch.cat([g.reshape(-1) for g in grads]), atol=1e-6, rtol=1e-5)
    assert obj.n_loss == 1 and obj.n_grad == 1


def test_losses_at_equals_loss_of_displaced_model() -> None:
    case = tanh_mlp_case()
    obj = _objective(case)
    gen = torch.Generator().manual_seed(3)
    d = 0.1 * torch.randn(3, obj.num_params, generator=gen)
    values = obj.losses_at(d)
    for i in range(3):
        moved = copy.deepcopy(case.model)
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(moved.parameters()) + d[i], moved.parameters()
        )
        ref = _objective(Case("moved", moved, case.loss_fn, case.batches)).loss()
        assert float(values[i]) == pytest.approx(ref, rel=1e-6)
    assert obj.n_loss == 3
    # An iterable of vectors (streamed) gives the same numbers.
    assert torch.equal(obj.losses_at(iter(list(d))), values)


def test_losses_at_keeps_non_finite_values_visible() -> None:
    case = tanh_mlp_case()
    obj = _objective(case)
    d = torch.zeros(2, obj.num_params)
    d[1, -1] = float("inf")  # an infinite logit: the loss is NaN there
    values = obj.losses_at(d)
    assert torch.isfinite(values[0]) and not torch.isfinite(values[1])


def test_parameter_glob_selects_a_layer_and_matches_the_dense_sub_block() -> None:
    case = tanh_mlp_case()
    obj = _objective(case, params="2.*")
    assert obj.param_names == ["2.weight", "2.bias"]
    h = dense_hessian(case, names=obj.param_names)
    assert obj.num_params == h.shape[0] == 24 * 24 + 24
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(obj.hvp(v).double(), h @ v.double(), rtol=1e-4, atol=1e-6)
    obj_list = _objective(case, params=["0.weight", "4.*"])
    assert obj_list.param_names == ["0.weight", "4.weight", "4.bias"]


def test_frozen_parameters_are_excluded_by_default() -> None:
    case = tanh_mlp_case()
    case.model[0].weight.requires_grad_(False)
    obj = _objective(case)
    assert "0.weight" not in obj.param_names
    h = dense_hessian(case, names=obj.param_names)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(obj.hvp(v).double(), h @ v.double(), rtol=1e-4, atol=1e-6)


def test_model_with_no_trainable_parameter_is_refused() -> None:
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Objective(model, lambda m, b: m(b).mean(), [torch.ones(2, 3)])


def test_unknown_glob_names_the_available_parameters() -> None:
    case = tanh_mlp_case()
    with pytest.raises(ValueError, match=r"matches no trainable parameter; available names: 0\.weight"):
        _objective(case, params="encoder.*")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hvp": "magic"}, "hvp must be one of"),
        ({"mode": "train"}, "mode must be 'eval' or 'batch_stats'"),
        ({"hvp": "forward_over_reverse", "mode": "batch_stats"}, "cannot run BatchNorm on batch statistics"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, str], message: str) -> None:
    case = tanh_mlp_case()
    with pytest.raises(ValueError, match=message):
        _objective(case, **kwargs)


def test_empty_probe_set_is_refused() -> None:
    with pytest.raises(ValueError, match="batches is empty"):
        Objective(nn.Linear(2, 1), ce_loss, [])


def test_non_scalar_loss_is_refused_with_a_hint() -> None:
    model = nn.Linear(3, 2)
    obj = Objective(model, lambda m, b: m(b), [torch.ones(4, 3)])
    with pytest.raises(ValueError, match=r"must return a scalar.*\.mean\(\)"):
        obj.loss()


def test_non_finite_loss_raises_a_clear_error() -> None:
    model = nn.Linear(3, 1)
    obj = Objective(model, lambda m, b: (m(b) / 0.0).mean(), [torch.ones(4, 3)])
    with pytest.raises(NonFiniteLossError):
        obj.loss()
    with pytest.raises(NonFiniteLossError):
        obj.hvp(torch.ones(obj.num_params))


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated (like many custom CUDA kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _CustomTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _OnceDifferentiableTanh.apply(x)


def test_auto_falls_back_to_finite_differences_with_one_warning() -> None:
    case = tanh_mlp_case()
    reference = dense_hessian(case)
    case.model[1] = _CustomTanh()
    case.model[3] = _CustomTanh()
    obj = _objective(case)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    with pytest.warns(HvpFallbackWarning, match="finite differences.*not symmetric.*ReLU kinks"):
        hv = obj.hvp(v)
    assert obj.active_engine == "finite_difference"
    assert obj.n_hvp == 1 and obj.n_hvp_check == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj.hvp(v)  # warned once only
    expected = reference @ v.double()
    assert float((hv.double() - expected).norm() / expected.norm()) < 2e-2
    # Plain double backward silently drops the once-differentiable op's second-order terms:
    # this is what the check guards against.
    wrong = _objective(case, hvp="cached").hvp(v).double()
    assert float((wrong - expected).norm() / expected.norm()) > 0.3


def test_auto_falls_back_when_double_backward_raises() -> None:
    case = tanh_mlp_case()

    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            if torch.is_grad_enabled() and grad.requires_grad:
                raise NotImplementedError("no second derivative for this op")
            return 2 * x * grad

    class Square(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return NoDoubleBackward.apply(x)

    case.model[1] = Square()
    obj = _objective(case)
    with pytest.warns(HvpFallbackWarning, match="NotImplementedError: no second derivative"):
        obj.hvp(torch.ones(obj.num_params))
    assert obj.active_engine == "finite_difference"


def test_cached_graph_follows_in_place_parameter_updates() -> None:
    case = tanh_mlp_case()
    obj = _objective(case, hvp="cached")
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    obj.hvp(v)
    with torch.no_grad():
        for p in case.model.parameters():
            p.mul_(1.5)
    fresh = _objective(case, hvp="double_backward").hvp(v)
    assert torch.allclose(obj.hvp(v), fresh, rtol=1e-5, atol=1e-7)


def _dropout_bn_model() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
    model.train()
    model[1].eval()  # a submodule the user deliberately froze must stay frozen
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    loss = ce_loss(model, (x, y))
    loss.backward()  # the user's .grad, which must survive
    return model, [(x[:20], y[:20]), (x[20:], y[20:])]


@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
@pytest.mark.parametrize("engine", ["auto", "double_backward", "forward_over_reverse", "finite_difference"])
def test_every_operation_leaves_model_grads_modes_and_rng_untouched(mode: str, engine: str) -> None:
    if engine == "forward_over_reverse" and mode == "batch_stats":
        pytest.skip("refused at construction (tested above)")
    model, batches = _dropout_bn_model()
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    before = snapshot(model)
    obj = Objective(model, ce_loss, batches, hvp=engine, mode=mode)  # type: ignore[arg-type]
    v = torch.ones(obj.num_params)
    obj.loss()
    obj.grad()
    obj.hvp(v)
    obj.hvp(v)
    obj.losses_at(torch.zeros(2, obj.num_params))
    assert_untouched(before, model)


def test_eval_mode_operator_is_symmetric_despite_dropout_and_batchnorm() -> None:
    model, batches = _dropout_bn_model()
    obj = Objective(model, ce_loss, batches)
    gen = torch.Generator().manual_seed(0)
    u, w = torch.randn(obj.num_params, generator=gen), torch.randn(obj.num_params, generator=gen)
    assert float(u @ obj.hvp(w)) == pytest.approx(float(w @ obj.hvp(u)), rel=1e-5)


def test_batch_stats_mode_uses_batch_statistics_not_running_ones() -> None:
    case = bn_cnn_case()
    eval_loss = _objective(case).loss()
    stats_loss = _objective(case, mode="batch_stats").loss()
    model = copy.deepcopy(case.model)
    for m in model.modules():
        m.training = isinstance(m, nn.BatchNorm2d)
    sizes = [len(b[0]) for b in case.batches]
    with torch.no_grad():
        expected = sum(n * float(ce_loss(model, b)) for n, b in zip(sizes, case.batches)) / sum(sizes)
    assert stats_loss == pytest.approx(expected, rel=1e-6)
    assert abs(stats_loss - eval_loss) > 1e-3


def test_all_reduce_hook_makes_one_shard_see_the_whole_probe_set() -> None:
    """Rank 0 holds one batch; the all-reduce adds what rank 1 would contribute (its sample count, its HVP)."""
    case = tanh_mlp_case()
    (b0, b1), (n0, n1) = case.batches, (64, 32)
    v = torch.randn(_objective(case).num_params, generator=torch.Generator().manual_seed(0))
    rank1_share = Objective(case.model, case.loss_fn, [b1]).hvp(v) * (n1 / (n0 + n1))

    def all_reduce_sum(t: Tensor) -> Tensor:
        return t + (torch.tensor(float(n1), dtype=t.dtype) if t.dim() == 0 else rank1_share)

    # An explicit engine: this stand-in reducer only knows rank 1's share of H v for this one v.
    shard = Objective(case.model, case.loss_fn, [b0], hvp="cached", all_reduce_sum=all_reduce_sum)
    assert torch.allclose(shard.hvp(v), _objective(case).hvp(v), rtol=1e-5, atol=1e-7)


def test_an_error_in_the_users_loss_is_not_mistaken_for_a_missing_double_backward() -> None:
    """The loss raising must propagate as it is, without switching the objective to finite differences."""
    case = tanh_mlp_case()
    state = {"broken": True}

    def flaky_loss(model: nn.Module, batch: object) -> Tensor:
        if state["broken"]:
            raise RuntimeError("boom in the probe loss")
        return ce_loss(model, batch)

    obj = Objective(case.model, flaky_loss, case.batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="boom in the probe loss"):
            obj.hvp(torch.ones(obj.num_params))
        state["broken"] = False
        obj.hvp(torch.ones(obj.num_params))  # works next time, still on double backward
    assert obj.active_engine == "cached"


# ---------------------------------------------------------------- silent zeros (issue 7, item 4)


def _no_grad_loss(model: nn.Module, batch: object) -> Tensor:
    with torch.no_grad():
        return ce_loss(model, batch)


def _inference_loss(model: nn.Module, batch: object) -> Tensor:
    with torch.inference_mode():
        return ce_loss(model, batch)


def _detached_loss(model: nn.Module, batch: object) -> Tensor:
    return ce_loss(model, batch).detach()


def _rebuilt_loss(model: nn.Module, batch: object) -> Tensor:
    return torch.tensor(ce_loss(model, batch).item())


def _integer_loss(model: nn.Module, batch: object) -> Tensor:
    x, y = batch  # type: ignore[misc]
    return (model(x).argmax(1) != y).sum()  # an error count: integer, no gradient


@pytest.mark.parametrize(
    ("loss_fn", "cause"),
    [
        (_no_grad_loss, "torch.no_grad()"),
        (_inference_loss, "inference_mode"),
        (_detached_loss, "detach"),
        (_rebuilt_loss, "item"),
        (_integer_loss, "integer tensor"),
    ],
)
@pytest.mark.parametrize("engine", ["auto", "double_backward", "forward_over_reverse", "finite_difference"])
def test_a_loss_without_gradient_is_refused_with_its_cause_and_the_fix(loss_fn, cause: str, engine: str) -> None:
    if engine == "forward_over_reverse" and loss_fn is _inference_loss:
        pytest.skip("torch.func itself refuses inference tensors ('Cannot set version_counter')")
    case = tanh_mlp_case()
    before = snapshot(case.model)
    obj = Objective(case.model, loss_fn, case.batches, hvp=engine)  # type: ignore[arg-type]
    with pytest.raises(
        DetachedLossError, match=r"does not require grad.*" + cause.replace("(", r"\(").replace(")", r"\)")
    ):
        obj.hvp(torch.ones(obj.num_params))
    with pytest.raises(DetachedLossError, match=r"Return the loss computed from the model's output"):
        obj.grad()
    assert_untouched(before, case.model)


def test_a_loss_that_ignores_the_selected_parameters_is_refused() -> None:
    case = tanh_mlp_case()
    obj = Objective(case.model, lambda m, b: m[4](torch.ones(3, 24)).sum() * 0 + 1.0, case.batches, params="0.*")
    with pytest.raises(DetachedLossError, match="does not use any of the selected parameters"):
        obj.grad()


def test_a_loss_linear_in_the_parameters_has_a_zero_hessian_without_error_or_warning() -> None:
    """Linear in the parameters: the gradient is not zero, the Hessian legitimately is."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    batches = [torch.randn(8, 5), torch.randn(4, 5)]
    obj = Objective(model, lambda m, b: m(b).mean(), batches)
    expected_grad = torch.autograd.grad(sum(len(b) * model(b).mean() for b in batches) / 12, list(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hv = obj.hvp(torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0)))
        g = obj.grad()
    assert torch.equal(hv, torch.zeros_like(hv))
    assert torch.allclose(g, torch.cat([t.reshape(-1) for t in expected_grad]), atol=1e-6)
    assert obj.active_engine == "cached"


# ---------------------------------------------------------------- symmetry check (issue 7, item 5)


class _ManualWeightNorm(nn.Module):
    """``weight = g * v / ||v||`` (row norms) written out: the exact function weight_norm computes."""

    def __init__(self, wn_linear: nn.Module) -> None:
        super().__init__()
        self.bias = nn.Parameter(wn_linear.bias.detach().double().clone())
        self.g = nn.Parameter(wn_linear.parametrizations.weight.original0.detach().double().clone())
        self.v = nn.Parameter(wn_linear.parametrizations.weight.original1.detach().double().clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return nn.functional.linear(x, weight, self.bias)


def _weight_norm_case(seed: int = 0) -> tuple[Case, Case]:
    """A tanh MLP with torch's weight_norm parametrization, and the same function written out."""
    case = tanh_mlp_case(seed)
    for i in (0, 2):
        case.model[i] = nn.utils.parametrizations.weight_norm(case.model[i])
    manual = copy.deepcopy(case.model).double()
    for i in (0, 2):
        manual[i] = _ManualWeightNorm(case.model[i])
    return case, Case("manual_weight_norm", manual, case.loss_fn, case.batches)


def test_weight_norm_double_backward_is_caught_as_asymmetric_and_falls_back() -> None:
    """torch's weight_norm kernel has a wrong double backward (||H - H^T|| / ||H|| about 0.13 here)."""
    case, manual = _weight_norm_case()
    exact = dense_hessian(manual)
    assert float((exact - exact.T).norm()) < 1e-12  # the true Hessian is symmetric
    v = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(0))
    expected = exact @ v.double()
    wrong = _objective(case, hvp="cached").hvp(v).double()
    assert float((wrong - expected).norm() / expected.norm()) > 0.05  # what the check guards against
    obj = _objective(case)
    with pytest.warns(HvpFallbackWarning, match=r"not symmetric \(estimated \|\|H - H\^T\|\|_F"):
        hv = obj.hvp(v).double()
    assert obj.active_engine == "finite_difference"
    assert obj.asymmetry_estimate is not None and obj.asymmetry_estimate > 0.03
    assert float((hv - expected).norm() / expected.norm()) < 1e-2
    # Through Lanczos, after the fallback: the extreme eigenvalues of the true Hessian.
    values = np.linalg.eigvalsh(exact.numpy())
    with pytest.warns(HvpFallbackWarning):
        result = extremal_eigenpairs(_objective(case), tol=1e-3)
    assert result.lambda_max == pytest.approx(values[-1], rel=5e-3)
    assert result.lambda_min == pytest.approx(values[0], abs=5e-3 * (values[-1] - values[0]))


@pytest.mark.parametrize("make_case", ALL_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_symmetry_check_is_silent_on_symmetric_float32_models(make_case, seed: int) -> None:
    case = make_case(seed)
    obj = _objective(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj.hvp(torch.ones(obj.num_params))
    assert obj.active_engine == "cached" and obj.n_hvp_check == 4
    assert obj.asymmetry_estimate is not None
    assert obj.asymmetry_estimate < 1e-5 < symmetry_tolerance(torch.float32) / 100


@pytest.mark.parametrize("n", [40, 1500])
def test_asymmetry_estimate_is_the_relative_frobenius_asymmetry_in_any_dimension(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    s = torch.randn(n, n, generator=gen, dtype=torch.float64)
    s = s + s.T
    k = torch.randn(n, n, generator=gen, dtype=torch.float64)
    h = s + 0.1 * (k - k.T)
    truth = float((h - h.T).norm() / h.norm())
    u = torch.randn(64, n, generator=gen, dtype=torch.float64)
    assert asymmetry(u, u @ h.T) == pytest.approx(truth, rel=0.15)
    assert asymmetry(u, u @ s.T) < 1e-14
    assert asymmetry(u, torch.zeros_like(u)) == 0.0


def test_symmetry_tolerance_follows_the_dtype() -> None:
    assert 5e-3 < symmetry_tolerance(torch.float32) < 2e-2
    assert symmetry_tolerance(torch.float64) < 1e-6
    assert symmetry_tolerance(torch.bfloat16) <= 0.05


# ---------------------------------------------------------------- buffers written in forward (issue 7, item 6)


class _CallCounter(nn.Module):
    """Counts its forward calls in a buffer, in place (as QAT observers update theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def _counting_case() -> Case:
    case = tanh_mlp_case()
    case.model.insert(2, _CallCounter())
    return case


@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
@pytest.mark.parametrize("engine", ["auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"])
def test_buffers_written_in_forward_are_copies_in_every_mode(mode: str, engine: str) -> None:
    if engine == "forward_over_reverse" and mode == "batch_stats":
        pytest.skip("refused at construction")
    case = _counting_case()
    before = snapshot(case.model)
    obj = _objective(case, hvp=engine, mode=mode)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    obj.loss()
    obj.grad()
    hv = obj.hvp(v)
    obj.losses_at(torch.zeros(2, obj.num_params))
    extremal_eigenpairs(obj, max_hvp=8)
    assert_untouched(before, case.model)
    assert int(case.model[2].calls) == 0
    reference = tanh_mlp_case()
    expected = dense_hessian(reference) @ v.double()
    tol = 2e-2 if engine == "finite_difference" else 1e-5
    assert float((hv.double() - expected).norm() / expected.norm()) < tol


def test_quantization_observers_are_not_updated_by_the_analysis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), torch.ao.quantization.FakeQuantize(), nn.Linear(8, 3))
    model.eval()  # observers still update in eval mode: only their enable flags stop them
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = snapshot(model)
    obj = Objective(model, ce_loss, [(x, y)], hvp="double_backward")
    obj.loss()
    obj.hvp(torch.ones(obj.num_params))
    obj.losses_at(0.1 * torch.ones(1, obj.num_params))
    assert_untouched(before, model)


def _graph_sizes(obj: Objective, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the batch sizes of every gradient graph the objective builds."""
    sizes: list[list[int]] = []
    build = obj._build_graph

    def recording(chunk):  # type: ignore[no-untyped-def]
        sizes.append([int(b[0].shape[0]) for b, _ in chunk])
        return build(chunk)

    monkeypatch.setattr(obj, "_build_graph", recording)
    return sizes


def test_symmetry_check_runs_on_a_slice_of_the_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check tests the ops, not the data: 16 samples of the first batch, then the products on the whole probe."""
    case = tanh_mlp_case()  # batches of 64 and 32 samples
    exact = dense_hessian(case)
    obj = _objective(case, hvp="auto")
    sizes = _graph_sizes(obj, monkeypatch)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(3))
    hv = obj.hvp(v).double()
    assert sizes[0] == [16]  # the check
    assert sum(sum(s) for s in sizes[1:]) == 96  # the product: every probe sample once
    assert obj.n_hvp_check == 4 and obj.asymmetry_estimate is not None and obj.asymmetry_estimate < 1e-4
    assert torch.allclose(hv, exact @ v.double(), rtol=1e-4, atol=1e-6)


def test_symmetry_check_uses_the_first_chunk_when_a_slice_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    case = tanh_mlp_case()

    def fixed_size_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        if batch[0].shape[0] not in (64, 32, 8):  # a model that only runs on the sizes it was built for
            raise RuntimeError("shape mismatch")
        return case.loss_fn(model, batch)

    obj = Objective(case.model, fixed_size_loss, case.batches, hvp="double_backward")
    obj.hvp_engine = "auto"  # the auto engine's check, on the fixed plan (one graph per batch)
    obj._plan_fixed("double_backward")
    sizes = _graph_sizes(obj, monkeypatch)
    obj.hvp(torch.ones(obj.num_params))
    assert sizes[:2] == [[16], [64]]  # the slice failed to run: the check fell back to the first batch
    assert obj.active_engine == "double_backward" and obj.asymmetry_estimate is not None
