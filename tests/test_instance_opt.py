"""Instance optimization: end to end on a bundled real-data pair, and its contracts."""

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pytest
import torch

from hybridreg import data
from hybridreg.config import from_dict
from hybridreg.metrics import dice, jacobian_stats
from hybridreg.objective import ObjectiveConfig, evaluate
from hybridreg.solvers import RegistrationResult, Solver, Status, get_solver, result_warnings
from hybridreg.spatial import gaussian_smooth, warp
from instance_opt import SOLVER, InstanceOptConfig, RelativeChangeStopping, minimize, register_pair
from instance_opt.solver import _crop, foreground_box

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensor(x):
    return torch.from_numpy(np.ascontiguousarray(x))[None, None]


@pytest.fixture(scope="module")
def pair():
    fid, mid = data.demo_pair()
    return data.load_subject(fid, 2), data.load_subject(mid, 2)


@pytest.fixture(scope="module")
def quick_result(pair):
    f, m = pair
    cfg = InstanceOptConfig(level_spacing=(8.0, 4.0), iterations=(60, 40), progress=False)
    return register_pair(tensor(f.image), tensor(m.image), cfg, spacing=f.spacing)


@pytest.mark.slow
def test_low_resolution_registration_improves_dice_without_folding(pair, quick_result):
    f, m = pair
    r = quick_result
    labels = data.evaluation_labels()
    warped = warp(tensor(m.labels), r.displacement, mode="nearest")[0, 0].numpy()
    before = np.nanmean(list(dice(f.labels, m.labels, labels).values()))
    after = np.nanmean(list(dice(f.labels, warped, labels).values()))
    assert after - before >= 0.1, (before, after)
    assert jacobian_stats(r.displacement)["folding_percent"] < 0.1
    # the result carries what a user needs
    assert r.displacement.shape == (1, 3, *f.image.shape)
    assert r.warped.shape == (1, 1, *f.image.shape)
    assert isinstance(r, RegistrationResult) and r.status in (Status.CONVERGED, Status.MAX_ITERATIONS)
    assert len(r.history) == 2 and all(h.iterations > 0 for h in r.history)
    assert all(len(h.terms["total"]) == h.iterations for h in r.history)
    assert r.history[0].terms["total"][0] > r.history[0].terms["total"][-1]
    lam = r.lambda_on_image_grid()
    assert lam.shape == (1, 1, *f.image.shape) and float(lam.std()) > 0  # voxelwise λ varies


def test_final_terms_are_the_shared_objective(pair, quick_result):
    """The solver's reported energy is evaluate() on its own (velocity, λ)."""
    f, m = pair
    r = quick_result
    ev = evaluate(tensor(f.image), tensor(m.image), r.velocity, r.lam, r.config.objective, f.spacing)
    assert float(ev.terms.total) == pytest.approx(r.final_terms["total"], rel=1e-5)
    assert torch.allclose(ev.displacement, r.displacement)


def test_uniform_lambda_baseline_same_code_path(pair):
    f, m = pair
    cfg = InstanceOptConfig(level_spacing=(8.0,), iterations=(15,), lambda_mode="uniform", lambda_init=1.0, progress=False)
    r = register_pair(tensor(f.image), tensor(m.image), cfg, spacing=f.spacing)
    assert r.lam.shape == (1, 1, 1, 1, 1) and float(r.lam) == 1.0
    assert r.final_terms["hyperprior"] == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_follow_request(device):
    torch.manual_seed(0)
    f = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    m = torch.roll(f, 1, dims=2)
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(3, 3), progress=False)
    r = register_pair(f, m, cfg, device=device)
    assert r.displacement.device.type == device and r.displacement.dtype == torch.float64


def test_2d_registration_recovers_a_shift():
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    f = torch.exp(-((y - 24) ** 2 + (x - 24) ** 2) / 60.0)[None, None]
    m = torch.exp(-((y - 26) ** 2 + (x - 23) ** 2) / 60.0)[None, None]
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(80, 40), objective=ObjectiveConfig(similarity="mse", w_reg=0.01), progress=False)
    r = register_pair(f, m, cfg)
    u = r.displacement[0, :, 20:28, 20:28].mean(dim=(1, 2))
    assert torch.allclose(u, torch.tensor([2.0, -1.0]), atol=0.3)


def test_callback_sees_the_optimised_velocity():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    f = torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 40.0)[None, None]
    m = torch.exp(-((y - 17) ** 2 + (x - 15) ** 2) / 40.0)[None, None]
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(25, 20), tol=0.0, window=10,
                            objective=ObjectiveConfig(similarity="mse", w_reg=0.01), progress=False)
    calls = []
    r = register_pair(f, m, cfg, callback=lambda lev, it, v, lam: calls.append((lev, it, v.clone(), lam.clone())))
    # every window, plus a level's last iteration when it is not a multiple of the window
    assert [(lev, it) for lev, it, _, _ in calls] == [(0, 10), (0, 20), (0, 25), (1, 10), (1, 20)]
    assert calls[0][2].shape == (1, 2, 16, 16) and calls[-1][2].shape == (1, 2, 32, 32)
    assert not calls[-1][2].requires_grad
    assert torch.equal(calls[-1][2], r.velocity) and torch.equal(calls[-1][3], r.lam)


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_the_1mm_level_runs_on_a_1mm_image_only(spacing):
    """The default ends with one step at 1 mm, velocity and λ on a 1 mm image's own grid;
    `configs/instance_full_resolution.yaml` is the default with 20 iterations there. On a 2 mm
    image that level's grids are the 2 mm level's: it is skipped, so the result is the 8/4/2 mm
    schedule's exactly, with one history entry per level run."""
    from pathlib import Path

    from hybridreg.config import load_yaml

    default = InstanceOptConfig()
    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "instance_full_resolution.yaml", InstanceOptConfig)
    assert replace(cfg, iterations=default.iterations) == default and default.level_spacing[-1] == 1.0
    f = gaussian_smooth(torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), 1.0)
    run = lambda c: register_pair(f, f.roll(1, 2), replace(c, progress=False), spacing=(spacing,) * 3)  # noqa: E731
    full, short = run(replace(default, iterations=(2, 2, 2, 2))), run(replace(default, level_spacing=(8.0, 4.0, 2.0), iterations=(2, 2, 2)))
    assert tuple(full.velocity.shape[2:]) == (16,) * 3
    if spacing == 1.0:
        assert full.history[-1].shape == (16,) * 3 and full.history[-1].iterations == 2
        assert tuple(short.velocity.shape[2:]) == (8,) * 3
    else:
        assert len(full.history) == len(short.history) and torch.equal(full.displacement, short.displacement)
    # 16 voxels: the 8 mm and 4 mm levels both clamp to 4 voxels a side at 1 mm, and the second is skipped
    assert len(full.history) == 3


def test_init_velocity_is_used():
    f = torch.rand(1, 1, 12, 12, 12)
    v0 = torch.full((1, 3, 6, 6, 6), 0.5)
    cfg = InstanceOptConfig(level_spacing=(1.0,), iterations=(0,), velocity_smoothing=0.0, progress=False)
    r = register_pair(f, f, cfg, init_velocity=v0)
    assert torch.allclose(r.displacement, torch.full_like(r.displacement, 1.0), atol=1e-5)  # 0.5 coarse voxels = 1 fine voxel


def test_foreground_box_margin_in_mm():
    img = torch.zeros(1, 1, 20, 30, 40)
    img[0, 0, 5:8, 10:12, 20:21] = 1.0
    # margin 2 mm: 2, 1 and 4 voxels at 1, 2 and 0.5 mm
    assert foreground_box(img, (1.0, 2.0, 0.5), 2.0) == (slice(3, 10), slice(9, 13), slice(16, 25))
    assert foreground_box(img, (1.0, 1.0, 1.0), 6.0) == (slice(0, 14), slice(4, 18), slice(14, 27))  # clipped at 0
    mask = torch.zeros_like(img)
    mask[0, 0, 19, 0, 39] = 1.0  # a mask replaces the intensities
    assert foreground_box(img, (1.0,) * 3, 0.0, mask) == (slice(19, 20), slice(0, 1), slice(39, 40))
    img[0, 0, 0, 29, 0] = 0.005  # under the threshold
    assert foreground_box(img, (1.0,) * 3, 0.0) == (slice(5, 8), slice(10, 12), slice(20, 21))
    # nothing foreground, or a box as large as the grid: no crop
    assert foreground_box(torch.zeros_like(img), (1.0,) * 3, 2.0) is None
    assert foreground_box(img, (1.0,) * 3, 100.0) is None


def test_crop_samples_an_initial_field_once_on_its_own_grid():
    """A coarse initial field is cut to the box at its own resolution by one linear sampling:
    exact for a linear function of position (each value: its voxel centre, in image voxels)."""
    pos = lambda n, scale: (torch.arange(n, dtype=torch.float64) + 0.5) * scale - 0.5  # noqa: E731
    t = pos(20, 2.0).view(1, 1, 20, 1, 1).expand(1, 1, 20, 4, 4).contiguous()  # a 2 mm grid over 40 image voxels
    box = (slice(7, 30), slice(0, 8), slice(0, 8))
    out = _crop(t, box, (40, 8, 8), field=False)
    assert out.shape[2] == 12  # 23 image voxels at the field's own 2 voxels each
    want = 7 + (torch.arange(12, dtype=torch.float64) + 0.5) * 23 / 12 - 0.5
    assert torch.allclose(out[0, 0, :, 0, 0], want, atol=1e-9)
    v = torch.full((1, 3, 20, 4, 4), 0.5, dtype=torch.float64)  # 0.5 of its voxels = 1 image voxel
    out = _crop(v, box, (40, 8, 8), field=True)
    assert torch.allclose(out[:, 0] * 23 / 12, torch.ones(1, 12, 4, 4, dtype=torch.float64))


def _blob(centre, n=40):
    z, y, x = torch.meshgrid(*(torch.arange(float(n)),) * 3, indexing="ij")
    return torch.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / 20.0)[None, None]


def test_crop_optimises_on_the_foreground_box_and_returns_the_whole_grid():
    f, m = _blob((14, 16, 15)), _blob((15, 16, 14))
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(30, 20), tol=0.0, crop=True, crop_margin=3.0,
                            objective=ObjectiveConfig(similarity="mse", w_reg=0.01), progress=False)
    box = foreground_box(f, (1.0,) * 3, 3.0)
    size = tuple(b.stop - b.start for b in box)
    assert all(n < 30 for n in size)  # the blob's r ≈ 9.6 voxels above 1 %, plus 3
    calls = []
    r = register_pair(f, m, cfg, callback=lambda lev, it, v, lam: calls.append((lev, v, lam)))
    assert r.history[-1].shape == size  # optimised on the box...
    assert r.displacement.shape == r.velocity.shape == (1, 3, 40, 40, 40) and r.warped.shape == f.shape  # ...returned whole
    # the callback sees the whole extent at each level's resolution (2 mm: about 20 voxels a side), as the result
    assert {lev for lev, _, _ in calls} == {0, 1} and all(v.shape[2:] == lam.shape[2:] for _, v, lam in calls)
    assert all(19 <= n <= 21 for lev, v, _ in calls if lev == 0 for n in v.shape[2:])
    assert all(v.shape == (1, 3, 40, 40, 40) for lev, v, _ in calls if lev == 1)
    assert torch.equal(calls[-1][1], r.velocity) and torch.equal(calls[-1][2], r.lam)
    lo, hi = box[0].start, box[0].stop  # outside the box: the values on its faces
    close = lambda a, b: torch.allclose(a, b, atol=1e-5)  # noqa: E731
    assert close(r.velocity[:, :, :lo], r.velocity[:, :, lo:lo + 1].expand(-1, -1, lo, -1, -1))
    assert close(r.velocity[:, :, hi:], r.velocity[:, :, hi - 1:hi].expand(-1, -1, 40 - hi, -1, -1))
    a = box[2].start
    assert close(r.lam[..., :a], r.lam[..., a:a + 1].expand(-1, -1, -1, -1, a))
    u = r.displacement[0, :, 13:16, 15:18, 14:17].mean(dim=(1, 2, 3))
    assert torch.allclose(u, torch.tensor([1.0, 0.0, -1.0]), atol=0.3)  # the shift, as without the crop
    assert jacobian_stats(r.displacement)["folding_percent"] == 0.0
    # a schedule ending on a coarser control grid returns its SVF at that resolution over the whole extent,
    # integrated there as without the box (not on the finer image grid, which gives another displacement)
    calls.clear()
    r2 = register_pair(f, m, replace(cfg, level_spacing=(2.0,), iterations=(30,)),
                       callback=lambda lev, it, v, lam: calls.append((lev, v, lam)))
    assert all(19 <= n <= 21 for n in r2.velocity.shape[2:]) and r2.lam.shape[2:] == r2.velocity.shape[2:]
    assert r2.displacement.shape == (1, 3, 40, 40, 40) and torch.equal(calls[-1][1], r2.velocity)
    assert torch.allclose(r2.displacement, evaluate(f, m, r2.velocity, r2.lam, cfg.objective, (1.0,) * 3).displacement)
    u2 = r2.displacement[0, :, 13:16, 15:18, 14:17].mean(dim=(1, 2, 3))
    assert torch.allclose(u2, torch.tensor([1.0, 0.0, -1.0]), atol=0.3)
    # an initial velocity over the whole grid is cut to the box: 0.5 half-grid voxels = 1 voxel everywhere
    r0 = register_pair(f, f, InstanceOptConfig(level_spacing=(1.0,), iterations=(0,), velocity_smoothing=0.0, crop=True,
                                               progress=False), init_velocity=torch.full((1, 3, 20, 20, 20), 0.5))
    assert torch.allclose(r0.displacement, torch.ones_like(r0.displacement), atol=1e-5)
    assert r0.history[-1].shape == tuple(b.stop - b.start for b in foreground_box(f, (1.0,) * 3, 8.0))


def test_relative_change_stopping():
    stop = RelativeChangeStopping(tol=1e-3, window=5, min_iterations=10)
    assert not stop([1.0] * 9)
    assert stop([1.0] * 10)
    assert not stop([10.0 - i for i in range(10)])


class _Terms(NamedTuple):
    total: torch.Tensor
    offset: torch.Tensor


def _quadratic():
    """(x − 1)² + 2 from x = 3 by SGD (lr 0.25 halves x − 1 per step): the loss is 6, 3, 2.25, ..."""
    x = torch.tensor([3.0], requires_grad=True)
    return (lambda: _Terms(((x - 1) ** 2).sum() + 2.0, torch.tensor(2.0))), torch.optim.SGD([x], lr=0.25), x


def test_minimize_converges_on_a_quadratic():
    closure, opt, x = _quadratic()
    calls = []
    r = minimize(closure, opt, None, RelativeChangeStopping(tol=1e-3, window=5, min_iterations=10), 100, window=5,
                 callback=calls.append)
    assert r.status is Status.CONVERGED and r.iterations == 15 and calls == [5, 10, 15]
    assert r.terms["total"][:3] == [6.0, 3.0, 2.25] and len(r.terms["total"]) == 15 and r.terms["offset"] == [2.0] * 15
    assert abs(float(x.detach()) - 1) < 1e-4 and r.seconds >= 0


def test_minimize_stops_at_the_iteration_budget():
    closure, opt, _ = _quadratic()
    calls = []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5**i)
    r = minimize(closure, opt, sched, RelativeChangeStopping(tol=0.0), 7, window=5, callback=calls.append)
    assert r.status is Status.MAX_ITERATIONS and r.iterations == 7 and calls == [5, 7]  # and after the last one
    assert len(r.terms["total"]) == 7 and r.terms["total"][1] == 3.0  # the first step ran at the full rate
    assert opt.param_groups[0]["lr"] == 0.25 * 0.5**7  # the scheduler stepped after every iteration
    r = minimize(closure, opt, None, RelativeChangeStopping(), 0, window=5, callback=calls.append)
    assert (r.status, r.iterations, r.terms, calls) == (Status.MAX_ITERATIONS, 0, {}, [5, 7])
    assert minimize(closure, opt, None, RelativeChangeStopping(), np.int64(2), window=np.int64(1)).iterations == 2
    for kwargs, name in (({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"max_iterations": -1}, "max_iterations")):
        # window 0 had failed with ZeroDivisionError at the first iteration
        with pytest.raises(ValueError, match=f"minimize.*`{name}`"):
            minimize(closure, opt, None, RelativeChangeStopping(), **{"max_iterations": 3, "window": 5, **kwargs})


def test_minimize_stops_each_pair_of_a_batch_on_its_own():
    """Two independent quadratics in one batch: each pair takes the steps it takes alone, stops at
    its own window (its parameters held from then on), and a pair whose energy overflows is
    reported DIVERGED while the other goes on."""
    rule = RelativeChangeStopping(tol=1e-3, window=5, min_iterations=10)

    stops = []

    def run(x0, rate):
        x = torch.tensor(x0, requires_grad=True)
        opt = torch.optim.SGD([x], lr=0.25)
        closure = lambda: _Terms(rate * (x - 1) ** 2 + 2.0, torch.full_like(x, 2.0))  # noqa: E731
        return minimize(closure, opt, None, rule, 100, window=5, on_stop=stops.append), x.detach()

    (a, xa), (b, xb) = run([3.0], torch.tensor([1.0])), run([3.0], torch.tensor([0.25]))
    assert stops == []  # one pair: the run ends when it stops
    both, x = run([3.0, 3.0], torch.tensor([1.0, 0.25]))
    assert stops == [[0]]  # told once, when pair 0 stopped and pair 1 went on
    assert both.pair_iterations == [a.iterations, b.iterations] and a.iterations < b.iterations == both.iterations
    assert both.pair_status == [Status.CONVERGED, Status.CONVERGED] and both.status is Status.CONVERGED
    assert both.pair_terms[0]["total"] == pytest.approx(a.terms["total"]) and len(both.pair_terms[0]["total"]) == a.iterations
    assert both.pair_terms[1]["total"] == pytest.approx(b.terms["total"])
    assert float(x[0]) == float(xa[0]) and float(x[1]) == float(xb[0])  # pair 0 held where it stopped
    assert both.terms["total"][0] == pytest.approx((a.terms["total"][0] + b.terms["total"][0]) / 2)

    y = torch.tensor([3.0, 3.0], requires_grad=True)
    opt = torch.optim.SGD([y], lr=0.25)
    blow = lambda: _Terms(torch.stack([(y[0] - 1) ** 2, torch.exp(50 * y[1] ** 2)]), y.detach())  # noqa: E731
    r = minimize(blow, opt, None, rule, 100, window=5)
    assert r.pair_status == [Status.CONVERGED, Status.DIVERGED] and r.status is Status.DIVERGED
    # on the CPU the overflow is judged at its first iteration, before its backward (it was at the window's end)
    assert r.pair_iterations[1] == 1 and r.pair_iterations[0] > 5 and float(y[0].detach()) == pytest.approx(1.0, abs=1e-3)


def test_a_level_that_ends_uphill_hands_on_its_start(pair):
    """FIXED against itself: the identity is the optimum, and Adam's first steps of ``lr`` voxels
    can only leave it (its normalised step turns a round-off gradient into a full one). A level of
    >= KEEP_START_ITERATIONS ends uphill and hands on its start, exactly; a shorter one is left as
    it ended."""
    from instance_opt.solver import KEEP_START_ITERATIONS

    f = tensor(pair[0].image)
    n = KEEP_START_ITERATIONS
    res = register_pair(f, f.clone(), InstanceOptConfig(level_spacing=(8.0,), iterations=(n,), progress=False),
                        spacing=pair[0].spacing)
    assert res.history[0].kept_start and float(res.velocity.abs().max()) == 0.0
    short = register_pair(f, f.clone(), InstanceOptConfig(level_spacing=(8.0,), iterations=(n - 1,), progress=False),
                          spacing=pair[0].spacing)
    assert not short.history[0].kept_start and float(short.velocity.abs().max()) > 0.1
    assert len(result_warnings(res)) == 1 and "stage 1/1" in result_warnings(res)[0] and result_warnings(short) == []


def test_an_identity_result_is_reported(pair):
    """A result that did not move MOVING (here: no iteration; in practice an untrained network)
    is one warning line; a registration that moved it is not."""
    f, m = tensor(pair[0].image), tensor(pair[1].image)
    idle = register_pair(f, m, InstanceOptConfig(level_spacing=(8.0,), iterations=(0,), progress=False), spacing=pair[0].spacing)
    moved = register_pair(f, m, InstanceOptConfig(level_spacing=(8.0,), iterations=(5,), progress=False), spacing=pair[0].spacing)
    assert [w.split(" (")[0] for w in result_warnings(idle)] == ["the displacement is the identity"]
    assert result_warnings(moved) == []


def test_batched_instance_optimization_equals_one_pair_at_a_time():
    """B pairs in one optimization (the energy a sum over pairs): in float64 each pair's result,
    stopping iteration and final terms equal its one-pair run's (float32 differs by summation order only)."""
    torch.manual_seed(1)
    f = gaussian_smooth(torch.rand(3, 1, 40, 36, dtype=torch.float64), 2.0)
    f = (f - f.amin((2, 3), keepdim=True)) / (f.amax((2, 3), keepdim=True) - f.amin((2, 3), keepdim=True))
    shift = torch.zeros(3, 2, 40, 36, dtype=torch.float64)
    shift[:, 0], shift[:, 1] = torch.tensor([0.0, -1.0, 2.5])[:, None, None], torch.tensor([0.0, 2.0, -1.5])[:, None, None]
    m = warp(f, shift)
    # tol 1e-2: on these smooth random images the pairs then stop at different iterations (checked
    # below: otherwise the per-pair stopping would go untested)
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(40, 60), tol=1e-2, min_iterations=10, progress=False)
    batch = register_pair(f, m, cfg, spacing=(1.0, 1.2))
    assert batch.pair_histories is not None and len(batch.pair_final_terms) == 3
    assert len({h[-1].iterations for h in batch.pair_histories}) > 1  # the pairs stopped apart
    for b in range(3):
        one, mine = register_pair(f[b:b + 1], m[b:b + 1], cfg, spacing=(1.0, 1.2)), batch.pair(b)
        assert [h.iterations for h in mine.history] == [h.iterations for h in one.history]
        assert [h.status for h in mine.history] == [h.status for h in one.history]
        assert torch.allclose(mine.displacement, one.displacement, atol=1e-9)
        assert mine.final_terms == pytest.approx(one.final_terms, rel=1e-9)
    assert batch.pair(0).displacement.shape == (1, 2, 40, 36)
    with pytest.raises(IndexError, match="pair 3 of a batch of 3"):
        batch.pair(3)


def test_solver_entry_points():
    inst, refine = get_solver("instance"), get_solver("learned+refine")
    assert inst is SOLVER and isinstance(inst, Solver) and isinstance(refine, Solver)
    assert inst.name == "instance" and inst.config_class is InstanceOptConfig
    assert inst.configure(inst.default_config()) == InstanceOptConfig()
    assert refine.name == "learned+refine" and refine.default_config().refine
    assert refine.configure(refine.config_class(refine=False)).refine
    with pytest.raises(ValueError, match="refine: true, the setting of --solver learned\\+refine"):
        get_solver("learned").configure(refine.config_class(refine=True))  # not run without its refinement
    with pytest.raises(ValueError, match="--solver.*instance.*'nope'"):
        get_solver("nope")
    f = torch.rand(1, 1, 8, 8, 8)
    r = inst.register_pair(f, f, InstanceOptConfig(level_spacing=(1.0,), iterations=(2,), progress=False))
    assert isinstance(r, RegistrationResult) and r.history[0].iterations == 2


@pytest.mark.parametrize(
    "data_,name",
    [({"level_spacing": [4, 2], "iterations": [10]}, "iterations"), ({"lr": -1}, "lr"), ({"lambda_mode": "patchwise"}, "lambda_mode"),
     ({"objective": {"w_reg": "a lot"}}, "w_reg"), ({"objective": {"typo": 1}}, "typo"), ({"level_spacing": [0]}, "level_spacing"),
     ({"lambda_init": 1.5}, "lambda_init"), ({"velocity_smoothing": -1.0}, "velocity_smoothing"),
     ({"lr_final_fraction": 0.0}, "lr_final_fraction"),
     ({"level_spacing": [], "iterations": []}, r"`level_spacing` must list at least one level")],
)
def test_config_errors_name_the_key(data_, name):
    with pytest.raises(ValueError, match=name):
        from_dict(InstanceOptConfig, data_)


def test_bad_images_are_rejected():
    good = torch.rand(1, 1, 8, 8, 8)
    bad = good.clone()
    bad[0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="moving.*NaN"):
        register_pair(good, bad)
    with pytest.raises(ValueError, match="same shape"):
        register_pair(good, torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="fixed"):
        register_pair(torch.rand(8, 8, 8), good)


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails the test: stands in for PyTorch's CPU grid_sample
    backward, which crashes the process on a NaN sampling grid."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("backward ran on a non-finite energy")


def test_minimize_on_the_cpu_never_back_propagates_a_non_finite_energy():
    """A total that turns NaN between two windows is judged at once, without its backward."""
    x = torch.tensor([3.0], requires_grad=True)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        total = ((x - 1) ** 2).sum() + (float("nan") if calls["n"] == 3 else 0.0)
        return _Terms(_NoBackward.apply(total) if calls["n"] == 3 else total, torch.tensor(0.0))

    r = minimize(closure, torch.optim.SGD([x], lr=0.25), None, RelativeChangeStopping(tol=0.0), 100, window=10)
    assert r.status is Status.DIVERGED and r.iterations == 3 and calls["n"] == 3
    assert float(x.detach()) == 1.5  # two steps: 3 -> 2 -> 1.5, none from the NaN energy


def test_a_pair_that_diverges_between_windows_costs_the_others_no_step():
    """On the CPU a running pair's non-finite energy stops it at once; the other pairs, evaluated
    again without it, take every step they take alone (a first version skipped the whole
    batch's step)."""
    def run(pairs, blow_at):
        y = torch.tensor([3.0] * pairs, requires_grad=True)
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            energies = [(y[0] - 1) ** 2]
            if pairs == 2:
                energies.append((y[1] - 1) ** 2 * (float("inf") if calls["n"] >= blow_at else 1.0))
            return _Terms(torch.stack(energies), y.detach())

        r = minimize(closure, torch.optim.SGD([y], lr=0.1), None, RelativeChangeStopping(tol=0.0), 7, window=5)
        return r, y.detach()

    alone, y_alone = run(1, None)
    both, y_both = run(2, 3)
    assert both.pair_status == [Status.MAX_ITERATIONS, Status.DIVERGED] and both.pair_iterations == [7, 3]
    assert float(y_both[0]) == float(y_alone[0]) and both.pair_terms[0]["total"] == alone.pair_terms[0]["total"]


def test_a_mask_with_nan_wrong_shape_or_values_outside_0_1_is_refused_naming_it():
    """A NaN in a mask made the velocity NaN after one step, and the next backward crashed the
    process (segfault); a mask off its grid gave a raw broadcasting error; 0/255 or negative
    masks were taken as weights."""
    f, m = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    cfg = InstanceOptConfig(progress=False, iterations=(2, 2, 2, 0))
    nan = torch.ones_like(f)
    nan[0, 0, 5, 5] = float("nan")
    for kwargs, match in [(dict(fixed_mask=nan), "`fixed_mask` contains NaN or Inf"),
                          (dict(moving_mask=nan.clone().fill_(float("inf"))), "`moving_mask` contains NaN or Inf"),
                          (dict(fixed_mask=torch.ones(1, 1, 5, 5)), r"`fixed_mask` must be \(1, 1, 16, 16\)"),
                          (dict(fixed_mask=torch.full_like(f, 255.0)), r"`fixed_mask` must hold weights in \[0, 1\]"),
                          (dict(moving_mask=-torch.ones_like(f)), r"`moving_mask` must hold weights in \[0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            register_pair(f, m, cfg, spacing=(2.0, 2.0), **kwargs)
    with pytest.raises(ValueError, match=r"`fixed_mask` must be \(1, 1, 16, 16\)"):
        evaluate(f, m, torch.zeros(1, 2, 16, 16), torch.ones(1, 1, 1, 1), ObjectiveConfig(), fixed_mask=torch.ones(1, 1, 3, 3))
    # an empty mask returned the identity as a registration; evaluate took a 0/255 mask as weights (LNCC −140) and a
    # NaN one gave a NaN energy; the Jacobian metrics counted NaN or 255 as inside
    with pytest.raises(ValueError, match="`fixed_mask` is empty"):
        register_pair(f, m, cfg, spacing=(2.0, 2.0), fixed_mask=torch.zeros_like(f))
    for mask, match in [(torch.full_like(f, 255.0), r"evaluate\(\): `moving_mask` must hold weights in \[0, 1\]"),
                        (nan, r"evaluate\(\): `moving_mask` contains NaN")]:
        with pytest.raises(ValueError, match=match):
            evaluate(f, m, torch.zeros(1, 2, 16, 16), torch.ones(1, 1, 1, 1), ObjectiveConfig(), moving_mask=mask)
    from hybridreg.metrics import jacobian_stats

    for mask, match in [(nan[0, 0], "`mask` contains NaN"), (torch.full((16, 16), 255.0), r"\[0, 1\]"),
                        (torch.zeros(16, 16, dtype=torch.bool), "`mask` is empty")]:
        with pytest.raises(ValueError, match=match):
            jacobian_stats(torch.zeros(2, 16, 16), mask)
    assert jacobian_stats(torch.zeros(2, 16, 16), f[0, 0] > 0.5)["folding_percent"] == 0.0
    ok = register_pair(f, m, cfg, spacing=(2.0, 2.0), fixed_mask=(f > 0.5), moving_mask=torch.ones(1, 1, 16, 16, dtype=torch.uint8))
    assert torch.isfinite(ok.displacement).all()


def test_half_precision_and_mixed_dtypes_are_refused_naming_the_argument():
    """bfloat16 gave an LNCC of −34 (range [−1, 0]) and a garbage registration reported as a
    result; two dtypes gave torch's "expected scalar type Double but found Float"."""
    f, m = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    cfg = InstanceOptConfig(progress=False)
    with pytest.raises(TypeError, match=r"register_pair\(\): `fixed` is torch.bfloat16: the toolkit computes in float32"):
        register_pair(f.bfloat16(), m.bfloat16(), cfg, spacing=(2.0, 2.0))
    with pytest.raises(TypeError, match=r"register_pair\(\): `moving` is torch.float64 on cpu but `fixed` is torch.float32"):
        register_pair(f, m.double(), cfg, spacing=(2.0, 2.0))
    with pytest.raises(TypeError, match=r"evaluate\(\): `fixed` is torch.float32 on cpu but `velocity` is torch.float64"):
        evaluate(f, m, torch.zeros(1, 2, 16, 16, dtype=torch.float64), torch.ones(1, 1, 1, 1), ObjectiveConfig())
    with pytest.raises(TypeError, match=r"warp\(\): `image` is torch.float64 on cpu but `disp` is torch.float32"):
        warp(f.double(), torch.zeros(1, 2, 16, 16))


def test_init_velocity_is_the_exact_start_and_init_lambda_must_be_positive():
    """The velocity was parametrised as G_σ * w from w = init_velocity, so a run started from
    G_σ * init_velocity (learned + refine lost the network's detail before its first step)."""
    gen = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 48, 40, generator=gen), torch.rand(1, 1, 48, 40, generator=gen)
    v0 = gaussian_smooth(3 * torch.randn(1, 2, 48, 40, generator=gen), 3.0)
    cfg = InstanceOptConfig(level_spacing=(2.0,), iterations=(0,), crop=False, velocity_smoothing=1.5, progress=False)
    assert (gaussian_smooth(v0, 1.5) - v0).abs().max() > 0.1  # what the old start lost
    r = register_pair(f, m, cfg, spacing=(2.0, 2.0), init_velocity=v0)
    torch.testing.assert_close(r.velocity, v0, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"register_pair\(\): `init_lambda` must be > 0, its smallest value is -1"):
        register_pair(f, m, cfg, spacing=(2.0, 2.0), init_lambda=-torch.ones(1, 1, 4, 4))


def test_one_mask_serves_every_pair_of_a_batch_whose_pairs_stop_apart():
    """A (1, 1, ...) mask, accepted for a batch, failed once its pairs stopped at different
    iterations (the running pairs' index ran past the mask's one entry)."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(3, 1, 32, 32, generator=g)
    m = torch.roll(f, 2, -1)
    m[1] = torch.rand(1, 32, 32, generator=g)
    cfg = InstanceOptConfig(progress=False, min_iterations=10, tol=1e-2)
    one = register_pair(f, m, cfg, spacing=(2.0, 2.0), fixed_mask=torch.ones(1, 1, 32, 32))
    each = register_pair(f, m, cfg, spacing=(2.0, 2.0), fixed_mask=torch.ones(3, 1, 32, 32))
    assert len({tuple(h.iterations for h in p) for p in one.pair_histories}) > 1  # they stopped apart
    torch.testing.assert_close(one.displacement, each.displacement, rtol=0, atol=0)


def test_a_malformed_moving_map_or_a_moving_spacing_without_one_is_refused_naming_it():
    """A (1, 2, 2) map gave a bare IndexError, a NaN map ran to DIVERGED without naming it, and a
    `moving_spacing` without a map was ignored (and defaulted to 1 mm in one solver, FIXED's spacing
    in the other)."""
    f, m = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    cfg = InstanceOptConfig(progress=False, iterations=(2, 2, 2, 0))
    for kwargs, match in [(dict(moving_map=torch.zeros(1, 2, 2)), r"`moving_map` must be \(1, 2, 3\)"),
                          (dict(moving_map=torch.full((1, 2, 3), float("nan"))), "`moving_map` contains NaN"),
                          (dict(moving_spacing=(2.0, 2.0)), "`moving_spacing` applies only with `moving_map`")]:
        with pytest.raises(ValueError, match=match):
            register_pair(f, m, cfg, spacing=(2.0, 2.0), **kwargs)
    # a map without `moving_spacing`: MOVING's voxel size is FIXED's, as with the spacing given
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    a = register_pair(f, m, cfg, spacing=(2.0, 2.0), moving_map=identity)
    b = register_pair(f, m, cfg, spacing=(2.0, 2.0), moving_map=identity, moving_spacing=(2.0, 2.0))
    assert torch.equal(a.displacement, b.displacement)


def test_evaluate_refuses_a_negative_lambda():
    """A negative λ gave a finite energy that rewards a rough field; a NaN λ (a diverging run's) stays the
    divergence check's."""
    f = torch.rand(1, 1, 16, 16)
    v = torch.zeros(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"evaluate\(\): `lam` must be ≥ 0"):
        evaluate(f, f, v, -torch.ones(1, 1, 1, 1), ObjectiveConfig())
    assert torch.isnan(evaluate(f, f, v, torch.full((1, 1, 1, 1), float("nan")), ObjectiveConfig()).terms.total).all()
