"""Memory-aware HVP engines: every plan gives the dense Hessian's products; out of memory leaves nothing held."""

from __future__ import annotations

import gc
import weakref
from collections import UserDict, namedtuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers import ALL_CASES, Case, bn_cnn_case, dense_hessian, tanh_mlp_case
from lightning_hessian import Objective, extremal_eigenpairs
from lightning_hessian._engines import GraphCost, SavedBytes, even_sizes, plan_pieces, split_batch

BUDGETS = [1.0, 2.0**12, 2.0**13, 2.0**14, 2.0**15, 2.0**16, 2.0**17, 2.0**18, 2.0**40]


def _six_batches(make_case) -> Case:
    """The case's probe set re-cut into six batches (enough chunks for some to be held, others rebuilt)."""
    case = make_case()
    batches = case.batches
    if isinstance(batches[0], dict):
        joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        n = len(joined["inputs"])
        cuts = even_sizes(n, 6)
        starts = [sum(cuts[:i]) for i in range(6)]
        new = [{k: v[a : a + c] for k, v in joined.items()} for a, c in zip(starts, cuts)]
    else:
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        cuts = even_sizes(len(x), 6)
        starts = [sum(cuts[:i]) for i in range(6)]
        new = [(x[a : a + c], y[a : a + c]) for a, c in zip(starts, cuts)]
    return Case(case.name + "_six", case.model, case.loss_fn, new)


def _relative_error(got: Tensor, expected: Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("make_case", ALL_CASES)
def test_every_plan_gives_the_dense_hessians_products(make_case) -> None:
    """From one graph for the whole probe set down to one-sample micro-batches rebuilt per product."""
    case = _six_batches(make_case)
    h = dense_hessian(case)
    vectors = torch.randn(3, h.shape[0], generator=torch.Generator().manual_seed(0))
    expected = vectors.double() @ h.T
    kinds, micros = set(), set()
    for budget in BUDGETS:
        obj = Objective(case.model, case.loss_fn, case.batches, memory_budget=budget)
        got = obj.hvps(vectors)
        assert _relative_error(got, expected) < 1e-5, (budget, obj.engine_plan)
        assert _relative_error(obj.hvp(vectors[0]), expected[0]) < 1e-5
        plan = obj.engine_plan
        assert plan is not None and plan.budget_bytes == budget
        kinds.add(plan.engine)
        micros.add(plan.micro_batch_size)
        if plan.peak_graph_bytes is not None and plan.micro_batch_size not in (None, 1):
            assert plan.peak_graph_bytes <= budget
    assert kinds == {"cached", "partially_cached", "double_backward"}
    assert {1, None} <= micros


@pytest.mark.parametrize("engine", ["cached", "double_backward"])
def test_explicit_engines_keep_their_plans(engine: str) -> None:
    case = tanh_mlp_case()
    obj = Objective(case.model, case.loss_fn, case.batches, hvp=engine)  # type: ignore[arg-type]
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    assert _relative_error(obj.hvp(v), dense_hessian(case) @ v.double()) < 1e-5
    plan = obj.engine_plan
    assert plan is not None and plan.micro_batch_size is None and obj.active_engine == engine
    assert (plan.chunks, plan.held_chunks) == ((1, 1) if engine == "cached" else (2, 0))
    assert obj.n_hvp_check == 0


@pytest.mark.parametrize("engine", ["auto", "cached", "double_backward", "forward_over_reverse", "finite_difference"])
def test_a_block_of_products_equals_the_products_one_by_one(engine: str) -> None:
    case = tanh_mlp_case()
    obj = Objective(case.model, case.loss_fn, case.batches, hvp=engine, memory_budget=2.0**13)  # type: ignore[arg-type]
    vectors = torch.randn(3, obj.num_params, generator=torch.Generator().manual_seed(0))
    block = obj.hvps(vectors)
    assert obj.n_hvp == 3
    for v, row in zip(vectors, block):
        assert torch.allclose(obj.hvp(v), row, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"vectors must have shape \(k, "):
        obj.hvps(vectors[0])


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), float("nan"), True, "1e9"])
def test_a_bad_memory_budget_fails_at_construction(budget: object) -> None:
    case = tanh_mlp_case()
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes or None"):
        Objective(case.model, case.loss_fn, case.batches, memory_budget=budget)  # type: ignore[arg-type]


def test_default_budget_holds_the_whole_graph_of_a_small_probe_set() -> None:
    case = bn_cnn_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    obj.hvp(torch.ones(obj.num_params))
    assert obj.active_engine == "cached"
    plan = obj.engine_plan
    assert plan is not None and plan.chunks == 1 and plan.training_step_bytes is not None
    assert plan.training_step_bytes > 0 and plan.budget_bytes is not None and plan.budget_bytes >= 16 * 2**20


def _centred_loss(model: nn.Module, batch: Any) -> Tensor:
    """Couples the samples of a batch (through the batch mean), so that cutting it changes the loss."""
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out - out.mean(0, keepdim=True), y) + out.var(0, correction=0).mean()


def test_a_loss_that_couples_samples_is_never_cut_into_micro_batches() -> None:
    base = tanh_mlp_case()
    case = Case("centred", base.model, _centred_loss, base.batches)
    obj = Objective(case.model, case.loss_fn, case.batches, memory_budget=1.0)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    assert _relative_error(obj.hvp(v), dense_hessian(case) @ v.double()) < 1e-5
    plan = obj.engine_plan
    assert plan is not None and plan.micro_batch_size is None and plan.chunks == 2
    assert "cannot be cut exactly" in plan.reason


def test_batch_statistics_mode_keeps_batches_whole() -> None:
    case = bn_cnn_case()
    small = Objective(case.model, case.loss_fn, case.batches, mode="batch_stats", memory_budget=1.0)
    whole = Objective(case.model, case.loss_fn, case.batches, mode="batch_stats", hvp="cached")
    v = torch.randn(small.num_params, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(small.hvp(v), whole.hvp(v), rtol=1e-5, atol=1e-6)
    assert small.engine_plan is not None and small.engine_plan.micro_batch_size is None


def test_micro_batches_follow_a_custom_batch_size_fn() -> None:
    """Weights from batch_size_fn (here: twice the sample count) stay exact when a batch is cut."""
    case = tanh_mlp_case()
    obj = Objective(
        case.model, case.loss_fn, case.batches, batch_size_fn=lambda b: 2 * len(b[0]), memory_budget=2.0**13
    )
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    assert _relative_error(obj.hvp(v), dense_hessian(case) @ v.double()) < 1e-5
    assert obj.engine_plan is not None and obj.engine_plan.micro_batch_size is not None


def test_lanczos_on_micro_batches_matches_the_dense_spectrum() -> None:
    case = bn_cnn_case()
    exact = torch.linalg.eigvalsh(dense_hessian(case))
    obj = Objective(case.model, case.loss_fn, case.batches, memory_budget=2.0**15)
    result = extremal_eigenpairs(obj, tol=1e-4)
    assert obj.engine_plan is not None and obj.engine_plan.micro_batch_size is not None
    assert result.lambda_max == pytest.approx(float(exact[-1]), rel=1e-3)
    assert result.lambda_min == pytest.approx(float(exact[0]), abs=1e-3 * float(exact[-1] - exact[0]))


# ---------------------------------------------------------------- cutting batches


Pair = namedtuple("Pair", ["x", "y"])


def test_split_batch_cuts_every_sample_tensor_and_shares_the_rest() -> None:
    x, y, w = torch.arange(10.0).reshape(5, 2), torch.arange(5), torch.ones(3)
    for batch in ((x, y), [x, y], {"x": x, "y": y}, Pair(x, y), UserDict(x=x, y=y)):
        pieces = split_batch(batch, [3, 2])
        assert pieces is not None and len(pieces) == 2
        assert type(pieces[0]) is type(batch)
        first = pieces[0]["x"] if isinstance(batch, (dict, UserDict)) else pieces[0][0]
        assert torch.equal(first, x[:3])
    pieces = split_batch({"x": x, "weights": w, "name": "probe", "k": 3}, [4, 1])
    assert pieces is not None and pieces[1]["weights"] is w and pieces[1]["name"] == "probe"
    assert torch.equal(pieces[1]["x"], x[4:])
    assert split_batch(object(), [1, 1]) is None
    assert split_batch((w, "a"), [2, 3]) is None  # no tensor with 5 samples
    assert split_batch((x, y), [5]) is None
    assert even_sizes(10, 3) == [4, 3, 3] and even_sizes(2, 5) == [1, 1]


def test_plan_pieces_keeps_graphs_alive_at_once_within_the_budget() -> None:
    graph = GraphCost(fixed=10.0, per_sample=1.0)
    assert plan_pieces([64, 32], graph, 200.0, True) == ([], None, 1)  # 74 + 42 fits: one graph, held
    counts, micro, held = plan_pieces([64, 32], graph, 50.0, True)
    assert micro == 40 and counts == [2, 1]
    sizes = [s for n, c in zip([64, 32], counts) for s in even_sizes(n, c)]  # 32, 32, 32
    assert held == 0 and max(graph(s) for s in sizes) <= 50.0
    # 74 + 42 does not fit: both whole, neither held (holding one leaves no room to rebuild the other).
    assert plan_pieces([64, 32], graph, 100.0, True) == ([1, 1], None, 0)
    # Three graphs of 42: one held plus one being rebuilt fit 100, two held plus one do not.
    assert plan_pieces([32, 32, 32], graph, 100.0, True) == ([1, 1, 1], None, 1)
    counts, micro, held = plan_pieces([64, 32], graph, 50.0, False)
    assert micro is None and counts == [1, 1] and held == 0


def test_saved_bytes_counts_what_autograd_keeps_for_backward() -> None:
    """tanh saves its output (64 x 1000 float32 = 256,000 bytes); inputs and parameters are not counted."""
    layer = nn.Linear(10, 1000)
    x = torch.randn(64, 10)
    with SavedBytes([x, *layer.parameters()]) as meter:
        out = torch.tanh(layer(x))
    assert meter.total == 64 * 1000 * 4
    del out


# ---------------------------------------------------------------- out of memory


class _Box:
    def __init__(self, t: Tensor) -> None:
        self.t = t


class _Tracker:
    """A loss that runs out of memory on call ``fail_at``; weak references to what autograd saves for it.

    Saved tensors are boxed by a pack hook, so a box lives exactly as long as the graph (or a
    frame) that holds it.
    """

    def __init__(self, error: BaseException, fail_at: int) -> None:
        self.error, self.fail_at, self.calls = error, fail_at, 0
        self.refs: list[weakref.ref[_Box]] = []

    def _pack(self, t: Tensor) -> _Box:
        box = _Box(t.detach())
        self.refs.append(weakref.ref(box))
        return box

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        self.calls += 1
        x, y = batch
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.t):
            out = torch.tanh(model(x))
            if self.calls == self.fail_at:
                raise self.error
            return nn.functional.cross_entropy(out, y)

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (injected)"), MemoryError("injected")])
def test_out_of_memory_propagates_and_leaves_nothing_held(error: BaseException) -> None:
    case = _six_batches(tanh_mlp_case)
    tracker = _Tracker(error, fail_at=10**9)
    obj = Objective(case.model, tracker, case.batches, memory_budget=2.0**16)
    v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
    with obj.session():
        expected = obj.hvp(v)
        plan = obj.engine_plan
        assert plan is not None and plan.engine == "partially_cached" and obj.held_graphs == plan.held_chunks > 0
        tracker.fail_at = tracker.calls + 2  # while rebuilding a graph that is not held
        caught: BaseException | None = None
        try:
            obj.hvp(v)
        except type(error) as err:
            caught = err
        assert caught is error  # the same exception, unwrapped: the caller can recognise it
        # Held graphs and the failed pass's activations are gone although the exception is alive.
        assert obj.held_graphs == 0
        assert tracker.alive() == 0
    assert obj.out_of_memory_events == 1
    tracker.fail_at = 10**9
    again = obj.hvp(v)  # re-planned with half the budget
    assert obj.engine_plan is not None and obj.engine_plan.budget_bytes == 2.0**15
    assert torch.allclose(again, expected, rtol=1e-5, atol=1e-7)


def test_release_and_leaving_the_session_free_every_graph() -> None:
    case = tanh_mlp_case()
    tracker = _Tracker(RuntimeError("unused"), fail_at=10**9)
    obj = Objective(case.model, tracker, case.batches, hvp="cached")
    v = torch.ones(obj.num_params)
    with obj.session():
        obj.hvp(v)
        assert obj.held_graphs == 1 and tracker.alive() > 0
        obj.release()
        assert obj.held_graphs == 0 and tracker.alive() == 0
        obj.hvp(v)
        assert obj.held_graphs == 1
    assert obj.held_graphs == 0 and tracker.alive() == 0


def test_a_cached_graph_is_not_held_between_measurements() -> None:
    case = tanh_mlp_case()
    tracker = _Tracker(RuntimeError("unused"), fail_at=10**9)
    obj = Objective(case.model, tracker, case.batches)
    extremal_eigenpairs(obj, max_hvp=10)
    assert obj.held_graphs == 0 and tracker.alive() == 0
