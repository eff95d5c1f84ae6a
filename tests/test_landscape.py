"""The loss-landscape instruments against exactly known answers: quadratic losses with a known
Hessian, a finite-difference Hessian of a small conv net, analytic surfaces, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekg.errors import EkgError
from ekg.landscape import (LandscapeConfig, Objective, analyse, hutchinson_trace, lanczos, model_objective,
                           power_iteration, random_directions, surface)


def _symmetric(eigs: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def _quadratic(a: torch.Tensor, b: torch.Tensor, theta0: torch.Tensor) -> tuple[Objective, nn.Parameter]:
    """f(θ) = ½ θᵀAθ + bᵀθ, split into two terms (as batches would be)."""
    theta = nn.Parameter(theta0.clone())

    def terms():
        yield 0.5 * theta @ a @ theta
        yield b @ theta

    return Objective(params=[theta], terms=terms), theta


EIGS = [6.0, 3.0, 2.0, 1.0, 0.5, -0.3, -1.0, -2.0]


def test_power_iteration_finds_the_largest_eigenvalue():
    a = _symmetric(EIGS)
    res = power_iteration(lambda v: a @ v, len(EIGS), iters=500, tol=1e-12, seed=3)
    assert res.converged
    assert res.eigenvalue == pytest.approx(6.0, rel=1e-8)


def test_power_iteration_through_autograd_hvp():
    a = _symmetric(EIGS, seed=1)
    obj, _ = _quadratic(a, torch.ones(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    v = torch.randn(8, dtype=torch.float64)
    assert torch.allclose(obj.hvp(v), a @ v, atol=1e-12)
    res = power_iteration(obj.hvp, obj.size, iters=500, tol=1e-12)
    assert res.eigenvalue == pytest.approx(6.0, rel=1e-8)


def test_lanczos_with_n_steps_gives_the_exact_spectrum():
    a = _symmetric(EIGS, seed=2)
    res = lanczos(lambda v: a @ v, len(EIGS), steps=50, seed=0)
    assert res.steps == len(EIGS)
    assert np.allclose(res.ritz_values, sorted(EIGS), atol=1e-9)
    assert res.lambda_min == pytest.approx(-2.0, abs=1e-9) and res.lambda_max == pytest.approx(6.0, abs=1e-9)
    assert sum(res.ritz_weights) == pytest.approx(1.0, abs=1e-9)


def test_lanczos_ends_converge_before_the_bulk():
    rng = np.random.RandomState(0)
    eigs = [10.0, 8.0, -5.0, -4.0] + list(rng.uniform(-1, 1, 196))
    a = _symmetric(eigs, seed=5)
    res = lanczos(lambda v: a @ v, 200, steps=60, seed=1)
    assert res.steps == 60
    assert res.lambda_max == pytest.approx(10.0, rel=1e-6)
    assert res.lambda_min == pytest.approx(-5.0, rel=1e-6)
    top = sorted(res.ritz_values, reverse=True)[:2]
    assert top[1] == pytest.approx(8.0, rel=1e-6)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    d = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=torch.float64)
    res = hutchinson_trace(lambda v: d * v, 4, samples=5)
    assert res.trace == pytest.approx(float(d.sum()), abs=1e-12)
    a = _symmetric(EIGS, seed=4)
    res = hutchinson_trace(lambda v: a @ v, 8, samples=4000, seed=7)
    exact = float(torch.trace(a))
    assert res.stderr > 0
    assert abs(res.trace - exact) < 4 * res.stderr


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _tiny(dtype=torch.float64):
    torch.manual_seed(0)
    net = _TinyNet().to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g))
               for _ in range(2)]
    return net, batches


def _finite_difference_hessian(obj: Objective, eps: float = 1e-5) -> torch.Tensor:
    n = obj.size
    flat = torch.cat([q.detach().reshape(-1) for q in obj.params])
    cols = []
    for i in range(n):
        grads = []
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * eps
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(shifted, obj.params)
            grads.append(obj.gradient())
        cols.append((grads[0] - grads[1]) / (2 * eps))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, obj.params)
    h = torch.stack(cols, 1)
    return (h + h.T) / 2


def test_hvp_spectrum_and_trace_of_a_conv_net_match_its_finite_difference_hessian():
    net, batches = _tiny()
    obj = model_objective(net, batches, bn="batch")
    h = _finite_difference_hessian(obj)
    v = torch.randn(obj.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(obj.hvp(v), h @ v, atol=1e-6)
    exact = np.linalg.eigvalsh(h.numpy())
    lz = lanczos(obj.hvp, obj.size, steps=obj.size)
    assert lz.lambda_min == pytest.approx(exact[0], abs=1e-6)
    assert lz.lambda_max == pytest.approx(exact[-1], abs=1e-6)
    pw = power_iteration(obj.hvp, obj.size, iters=2000, tol=1e-12)
    biggest = exact[np.argmax(np.abs(exact))]
    assert pw.eigenvalue == pytest.approx(biggest, rel=1e-4)
    tr = hutchinson_trace(obj.hvp, obj.size, samples=3)
    assert abs(tr.trace - float(torch.trace(h))) < 10 * tr.stderr + 1e-6


def test_batch_statistics_mode_leaves_running_statistics_alone():
    net, batches = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = LandscapeConfig(batch_size=8, power_iters=3, lanczos_steps=4, hutchinson_samples=2, surface_1d=3,
                          surface_2d=3, device="cpu")
    analyse(net, batches, cfg, progress=False)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training  # mode restored


def test_surface_of_a_known_function():
    a = _symmetric(EIGS, seed=6)
    b = torch.linspace(-1, 1, 8, dtype=torch.float64)
    theta0 = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    obj, theta = _quadratic(a, b, theta0)
    d1, d2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-0.5, 2, 4)
    grid = surface(obj, [[d1], [d2]], [xs, ys])
    assert grid.shape == (5, 4)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            t = theta0 + x * d1 + y * d2
            assert grid[i, j] == pytest.approx(float(0.5 * t @ a @ t + b @ t), rel=1e-12, abs=1e-12)
    assert torch.equal(theta.detach(), theta0)  # restored
    line = surface(obj, [[d1]], [xs])
    assert np.allclose(line, grid[:, 0] * 0 + [float(0.5 * (theta0 + x * d1) @ a @ (theta0 + x * d1) + b @ (theta0 + x * d1))
                                             for x in xs])


def test_filter_normalised_directions():
    net, _ = _tiny(torch.float32)
    params = list(net.parameters())
    (d,) = random_directions(params, 1, seed=0)
    for p, q in zip(params, d):
        if p.dim() <= 1:
            assert torch.count_nonzero(q) == 0  # BN and biases do not move
        else:
            assert torch.allclose(q.reshape(len(q), -1).norm(dim=1), p.reshape(len(p), -1).norm(dim=1), rtol=1e-5)


def test_analyse_is_deterministic_under_a_seed():
    net, batches = _tiny(torch.float32)
    cfg = LandscapeConfig(batch_size=8, power_iters=5, power_tol=0, lanczos_steps=5, hutchinson_samples=3,
                          surface_1d=3, surface_2d=3, device="cpu")
    r1 = analyse(net, batches, cfg, progress=False)
    r2 = analyse(net, batches, cfg, progress=False)
    for k in ("lambda_max", "lambda_min", "trace", "ritz", "surface_1d", "surface_2d", "loss"):
        assert r1[k] == r2[k], k
    cfg.seed = 1
    r3 = analyse(net, batches, cfg, progress=False)
    assert r3["power"]["history"] != r1["power"]["history"]
    assert r3["surface_2d"] != r1["surface_2d"]


def test_bad_settings_are_refused():
    with pytest.raises(EkgError, match="`bn`"):
        LandscapeConfig(bn="train").validate()
    with pytest.raises(EkgError, match="`surface_2d`"):
        LandscapeConfig(surface_2d=1).validate()
    with pytest.raises(EkgError, match="no images"):
        net, _ = _tiny()
        model_objective(net, [])


def test_json_round_trip_of_results():
    net, batches = _tiny(torch.float32)
    cfg = LandscapeConfig(batch_size=8, power_iters=2, lanczos_steps=3, hutchinson_samples=2, surface_1d=0,
                          surface_2d=0, device="cpu")
    res = analyse(net, batches, cfg, progress=False)
    assert json.loads(json.dumps(res)) == res
    assert "surface_1d" not in res and res["images"] == 16


def test_channels_last_gives_the_same_hessian_products():
    net, batches = _tiny(torch.float32)
    obj = model_objective(net, batches)
    v = torch.randn(obj.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = obj.hvp(v)
    net.to(memory_format=torch.channels_last)
    cl = model_objective(net, [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches])
    assert torch.allclose(cl.hvp(v), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_landscape_cli_on_a_real_checkpoint(tmp_path, shared_data, cifar10_exact, capsys):
    from ekg.cli import main

    out = tmp_path / "scape"
    args = ["landscape", "--model", str(shared_data / "pretrained/akamaster/resnet20-12fca82f.th"), "--data",
            str(cifar10_exact), "--out", str(out), "--images", "40", "--batch-size", "20", "--power-iters", "4",
            "--lanczos-steps", "4", "--hutchinson-samples", "2", "--surface-1d", "5", "--surface-2d", "3",
            "--device", "cpu", "--quiet"]
    assert main(args) == 0
    rec = json.loads((out / "landscape.json").read_text())
    for key in ("lambda_max", "lambda_min", "trace", "neg_ratio"):
        assert isinstance(rec[key], float) and key in rec["definitions"]
    assert rec["lambda_max"] > 0 and rec["images"] == 40 and rec["params"] == 269722
    assert rec["settings"]["bn"] == "batch" and rec["data_split"] == "train"
    grid = json.loads((out / "surface_2d.json").read_text())
    assert np.array(grid["loss"]).shape == (3, 3)
    # the centre of both surfaces is the model itself: the measured loss
    assert grid["loss"][1][1] == pytest.approx(rec["loss"], rel=1e-5)
    assert json.loads((out / "surface_1d.json").read_text())["loss"][2] == pytest.approx(rec["loss"], rel=1e-5)
    for png in ("surface_1d.png", "surface_2d_contour.png", "surface_2d_3d.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lambda_max" in capsys.readouterr().out
    # an existing result is not overwritten silently; bad settings are one line
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert main(args[:-1] + ["--surface-2d", "1", "--force", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ekg: error:") and "--surface-2d" in err and len(err.strip().splitlines()) == 1


def test_a_masked_network_is_measured_as_its_slim_twin():
    from ekg.masks import MaskedNetwork
    from ekg.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", seed=0)
    net = MaskedNetwork(model)
    net.set_rates([0.5] * len(net.gates))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    cfg = LandscapeConfig(batch_size=8, power_iters=2, lanczos_steps=2, hutchinson_samples=1, surface_1d=0,
                          surface_2d=0, device="cpu")
    res = analyse(net, batches, cfg, progress=False)
    from ekg.landscape import bn_mode

    with bn_mode(net, "batch"), torch.no_grad():
        masked_loss = float(F.cross_entropy(net(batches[0][0]), batches[0][1]))
    assert res["loss"] == pytest.approx(masked_loss, rel=1e-4)
    assert res["params"] < sum(p.numel() for p in model.parameters()) * 0.6
