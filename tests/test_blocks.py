"""Per-block spectra against the dense Hessian's diagonal blocks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from helpers import assert_untouched, bn_cnn_case, dense_hessian, snapshot, tanh_mlp_case
from lightning_hessian import Objective, hutchinson_trace
from lightning_hessian.blocks import REST, BlockSpectrum, block_spectrum, parameter_blocks


@functools.cache
def _dense(name: str) -> torch.Tensor:
    return dense_hessian({"tanh_mlp": tanh_mlp_case, "bn_cnn": bn_cnn_case}[name]())


def _objective(name: str) -> Objective:
    case = {"tanh_mlp": tanh_mlp_case, "bn_cnn": bn_cnn_case}[name]()
    return Objective(case.model, case.loss_fn, case.batches)


def test_default_blocks_are_the_modules_that_own_parameters() -> None:
    obj = _objective("bn_cnn")
    blocks = parameter_blocks(obj)
    assert [b.name for b in blocks] == ["0", "1", "4", "5", "8"]  # conv, BN, conv, BN, linear
    assert blocks[0].param_names == ("0.weight", "0.bias")
    assert sum(b.num_params for b in blocks) == obj.num_params
    flat = torch.cat([b.index for b in blocks])
    assert torch.equal(flat, torch.arange(obj.num_params))


def test_user_globs_make_blocks_and_the_rest_is_its_own_block() -> None:
    obj = _objective("tanh_mlp")
    blocks = parameter_blocks(obj, {"weights": "*.weight", "last": ["4.bias"]})
    assert [b.name for b in blocks] == ["weights", "last", REST]
    assert blocks[0].param_names == ("0.weight", "2.weight", "4.weight")
    assert blocks[2].param_names == ("0.bias", "2.bias")
    assert [b.name for b in parameter_blocks(obj, ["0.*", "2.*", "4.*"])] == ["0.*", "2.*", "4.*"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"a": "0.*", "b": "0.weight"}, "is in two blocks"),
        ({"a": "conv*"}, "matches no parameter"),
        ({}, "blocks is empty"),
    ],
)
def test_bad_block_specifications_are_refused(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parameter_blocks(_objective("tanh_mlp"), spec)


@pytest.mark.parametrize("name", ["tanh_mlp", "bn_cnn"])
def test_block_traces_sum_to_the_total_and_match_dense_block_traces(name) -> None:
    obj = _objective(name)
    h = _dense(name)
    result = block_spectrum(obj, n_trace=60, only=[], seed=3)
    assert result.n_hvp == result.n_hvp_trace == 60
    assert sum(b.trace for b in result.blocks) == pytest.approx(result.trace, rel=1e-9, abs=1e-12)
    # The total is exactly plain Hutchinson on the same probes (same generator, same seed).
    plain = hutchinson_trace(obj, n=60, method="hutchinson", seed=3)
    assert result.trace == pytest.approx(plain.value, rel=1e-6)
    assert result.trace_stderr == pytest.approx(plain.stderr, rel=1e-6)
    for block, stats in zip(parameter_blocks(obj), result.blocks):
        idx = block.index
        dense_trace = float(torch.trace(h[idx][:, idx]))
        assert abs(stats.trace - dense_trace) <= 4 * stats.trace_stderr + 1e-5 * abs(dense_trace)


@pytest.mark.parametrize("name", ["tanh_mlp", "bn_cnn"])
def test_block_lambda_max_matches_the_dense_diagonal_block(name) -> None:
    obj = _objective(name)
    h = _dense(name)
    global_max = float(torch.linalg.eigvalsh(h)[-1])
    strict = block_spectrum(obj, n_trace=0, tol=1e-6, max_hvp_per_block=200)
    default = block_spectrum(obj, n_trace=0)
    for block, s, d in zip(parameter_blocks(obj), strict.blocks, default.blocks):
        idx = block.index
        exact = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert s.measured and s.converged
        assert s.lambda_max == pytest.approx(exact, rel=1e-4, abs=1e-7)
        # The default (monitor) tolerance: the value is within its stated error bound.
        assert d.converged
        assert abs(d.lambda_max - exact) <= d.error_bound + 1e-5 * abs(exact) + 1e-7
        assert d.error_bound <= 1e-3 * abs(d.lambda_max) + 1e-12
        # Cauchy interlacing: a diagonal block is never sharper than the whole Hessian.
        assert d.lambda_max <= global_max * (1 + 1e-5)
        assert d.vector is not None and d.vector.shape == (block.num_params,)


def test_warm_starts_spend_fewer_products_after_a_small_step() -> None:
    case = tanh_mlp_case()
    obj = Objective(case.model, case.loss_fn, case.batches)
    cold = block_spectrum(obj, n_trace=0)
    grads = obj.grad()
    with torch.no_grad():
        params = torch.nn.utils.parameters_to_vector(case.model.parameters())
        torch.nn.utils.vector_to_parameters(params - 0.01 * grads, case.model.parameters())
    warm = block_spectrum(obj, n_trace=0, init=cold)
    assert warm.n_hvp < cold.n_hvp
    for c, w in zip(cold.blocks, warm.blocks):
        assert w.converged
        assert w.lambda_max == pytest.approx(c.lambda_max, rel=0.1)


def test_a_total_budget_rotates_over_the_blocks() -> None:
    obj = _objective("bn_cnn")
    first = block_spectrum(obj, n_trace=4, max_hvp=25, max_hvp_per_block=12)
    measured = [b.name for b in first.blocks if b.measured]
    assert 0 < len(measured) < 5
    assert sum(b.n_hvp for b in first.blocks) <= 25
    assert np.isnan(first[first.names[-1]].lambda_max) and not first[first.names[-1]].measured
    assert all(f"block/{b}/lambda_max" in first.metrics() for b in measured)
    assert len([k for k in first.metrics() if k.endswith("/trace")]) == 5
    seen = set(measured)
    result: BlockSpectrum = first
    for _ in range(6):
        result = block_spectrum(obj, n_trace=4, max_hvp=25, max_hvp_per_block=12, init=result)
        seen |= {b.name for b in result.blocks if b.measured}
    assert seen == set(first.names)


def test_no_side_effects_and_bad_arguments() -> None:
    case = bn_cnn_case()
    case.model.train()
    before = snapshot(case.model)
    obj = Objective(case.model, case.loss_fn, case.batches)
    block_spectrum(obj, n_trace=3, max_hvp_per_block=5)
    assert_untouched(before, case.model)
    with pytest.raises(ValueError, match="only names unknown blocks"):
        block_spectrum(obj, only=["fc"])
    with pytest.raises(ValueError, match="tol must be in"):
        block_spectrum(obj, tol=0.0)
    with pytest.raises(ValueError, match="n_trace must be"):
        block_spectrum(obj, n_trace=-1)
    with pytest.raises(KeyError, match="no block"):
        block_spectrum(obj, n_trace=2, only=[])["fc"]
