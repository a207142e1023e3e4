"""The solver interface: what a solver of the hybridreg energy returns, and how one is found.

The model (this package) defines the interface; solvers implement it in their own packages
(``instance_opt``, ``learned``, or a third party's) and announce themselves through the
entry-point group :data:`ENTRY_POINT_GROUP`, declared in their ``pyproject.toml``::

    [project.entry-points."hybridreg.solvers"]
    instance = "instance_opt.solver:SOLVER"

:func:`get_solver` loads one by name, so the model never names a solver module and a
plug-in solver is used by the CLI (``register``, ``batch``), the service and the benchmarks as
ours are (``docs/development.md``, "Plugging in a solver"; tuning runs hybridreg's own solvers).

Fields and displacements follow ``docs/conventions.md``: channels-first ``(B, d, *spatial)``
in voxel units of the grid they live on, component k along tensor axis k + 2.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from .objective import ObjectiveConfig
from .spatial import check_alike, check_mask

__all__ = ["ENTRY_POINT_GROUP", "Status", "LevelHistory", "RegistrationResult", "final_terms_of", "Solver", "available_solvers",
           "get_solver", "check_images", "check_result", "synchronize", "divergence", "result_warnings", "kept_start_warning", "IDENTITY_VOXELS",
           "FIXED_POINT_SHARE"]

ENTRY_POINT_GROUP = "hybridreg.solvers"
"""Entry-point group under which solvers register (name → an object satisfying :class:`Solver`)."""


class Status(str, enum.Enum):
    """How one stage of a solver ended (a ``str`` enum: it serialises as its value).

    ``converged``: the stopping rule fired; ``max_iterations``: the iteration budget ran out;
    ``network``: one forward pass of a network (no iterations); ``diverged``: the energy or
    the result stopped being finite, or collapsed (never written as a result).
    """

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NETWORK = "network"
    DIVERGED = "diverged"


@dataclass
class LevelHistory:
    """History of one stage (a pyramid level of the optimiser, or a network pass).

    Attributes:
        spacing: voxel size of the stage's grid, mm per tensor axis.
        shape: the stage's image grid. control_shape: the velocity (and λ) grid.
        terms: per-iteration values of every :class:`hybridreg.objective.EnergyTerms` field
            (empty for a network pass).
        iterations: iterations run (1 for a network pass). status: a :class:`Status`.
        seconds: wall time of the stage.
        kept_start: the level ended with a higher energy than at its start, so the optimiser
            handed on its start instead (:data:`instance_opt.solver.KEEP_START_ITERATIONS`).
    """

    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    control_shape: tuple[int, ...]
    terms: dict[str, list[float]]
    iterations: int
    status: Status
    seconds: float
    kept_start: bool = False

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / max(self.iterations, 1)


@dataclass
class RegistrationResult:
    """What every solver returns for a batch of pairs (method §2).

    Attributes:
        displacement: ``(B, d, *spatial)`` voxel-unit displacement of φ = exp(v) on the
            fixed image grid (``warped = moving ∘ (id + displacement)``).
        velocity: ``(B, d, *control)`` the SVF in voxels of its own (control) grid.
        lam: ``(B, 1, *control)`` λ on the control grid (``(B, 1, 1, ...)`` if uniform).
        warped: ``(B, C, *spatial)`` the warped moving image.
        history: one :class:`LevelHistory` per stage, in the order they ran.
        seconds: total wall time of the solver.
        config: the solver configuration used.
        final_terms: the energy terms (:class:`hybridreg.objective.EnergyTerms` fields) of
            the result, evaluated on the image grid.
        svf_steps: the scaling-and-squaring steps that integrated ``velocity`` (for the
            inverse, :meth:`inverse_displacement`).
        pair_histories, pair_final_terms: for a batch whose pairs were optimised each on its
            own (batched instance optimization), each pair's history and final terms;
            ``history`` and ``final_terms`` are then the batch's (terms averaged over the
            pairs, status ``DIVERGED`` if any pair diverged). ``None`` otherwise.
    """

    displacement: torch.Tensor
    velocity: torch.Tensor
    lam: torch.Tensor
    warped: torch.Tensor
    history: list[LevelHistory]
    seconds: float
    config: Any
    final_terms: dict[str, float]
    svf_steps: int = field(default_factory=lambda: ObjectiveConfig().svf_steps)
    pair_histories: list[list[LevelHistory]] | None = None
    pair_final_terms: list[dict[str, float]] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.displacement.shape[0])

    def pair(self, i: int) -> "RegistrationResult":
        """Pair ``i`` of the batch as a one-pair result (tensors ``(1, ...)``, its own history
        and final terms when the solver kept them; ``seconds`` stays the whole batch's).

        Raises:
            IndexError: ``i`` outside ``[0, batch_size)``.
        """
        if not 0 <= i < self.batch_size:
            raise IndexError(f"RegistrationResult.pair(): pair {i} of a batch of {self.batch_size}")
        if self.batch_size == 1:
            return self
        sl = slice(i, i + 1)
        return replace(self, displacement=self.displacement[sl], velocity=self.velocity[sl], lam=self.lam[sl],
                       warped=self.warped[sl],
                       history=self.pair_histories[i] if self.pair_histories else self.history,
                       final_terms=self.pair_final_terms[i] if self.pair_final_terms else self.final_terms,
                       pair_histories=None, pair_final_terms=None)

    @property
    def status(self) -> Status:
        """The last stage's status (``network`` when nothing ran)."""
        return self.history[-1].status if self.history else Status.NETWORK

    def inverse_displacement(self, tolerance: float) -> torch.Tensor:
        """``(B, d, *spatial)`` voxel-unit displacement of φ⁻¹ on the fixed grid: exp(−v)
        (method §1.1: the SVF gives the inverse up to integration error), resized to the image
        grid and refined against the displacement actually written
        (:func:`hybridreg.spatial.invert_displacement`: relaxed fixed point, then least squares
        on both compositions where the fixed point leaves more than ``tolerance`` voxels of
        mean error; the service gives :data:`hybridreg.service.INVERSE_TOLERANCE_MM` over the
        voxel size), so that the two written fields undo each other both ways. The fixed point
        stops once its own error is :data:`FIXED_POINT_SHARE` of ``tolerance``.

        Raises:
            ValueError: a negative ``tolerance``.
        """
        from .spatial import invert_displacement, resize_field, scaling_and_squaring

        with torch.no_grad():
            start = resize_field(scaling_and_squaring(-self.velocity, self.svf_steps), self.displacement.shape[2:])
            return invert_displacement(self.displacement, initial=start, tolerance=tolerance,
                                       fixed_point_tolerance=FIXED_POINT_SHARE * tolerance)

    def lambda_on_image_grid(self) -> torch.Tensor:
        """λ resampled (linearly, cell-centred) to the image grid, ``(B, 1, *spatial)``."""
        from .spatial import resize_image

        spatial = self.displacement.shape[2:]
        lam = self.lam
        if all(n == 1 for n in lam.shape[2:]):
            return lam.expand(lam.shape[0], 1, *spatial).clone()
        return resize_image(lam, spatial)


def final_terms_of(terms: Any) -> tuple[dict[str, float], list[dict[str, float]] | None]:
    """``(final_terms, pair_final_terms)`` of a :class:`RegistrationResult` from per-pair energy
    terms (an :class:`hybridreg.objective.EnergyTerms` of ``(B,)`` tensors, ``evaluate(...,
    per_pair=True)``): the mean over the pairs, and each pair's (``None`` for one pair)."""
    values = {k: t.detach().reshape(-1).tolist() for k, t in terms._asdict().items()}
    n = len(values["total"])
    mean = {k: sum(v) / n for k, v in values.items()}
    return mean, ([{k: v[b] for k, v in values.items()} for b in range(n)] if n > 1 else None)


@runtime_checkable
class Solver(Protocol):
    """A solver of the hybridreg energy, as found by :func:`get_solver`.

    Attributes:
        name: the name users select it by (``--solver NAME``), equal to its entry-point name.
        config_class: the typed (dataclass) configuration read from ``--config`` YAML.
    """

    name: str
    config_class: type

    def default_config(self) -> Any:
        """The configuration used when the user gives none."""

    def configure(self, config: Any) -> Any:
        """``config`` with the fields this solver name fixes (e.g. ``refine=True`` for
        ``learned+refine``); the result is what is run and written to ``config.yaml``."""

    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor, config: Any = None, *,
                      spacing: Sequence[float] | None = None, device: str | torch.device | None = None,
                      moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                      fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
                      fixed_direction: Sequence[float] | None = None) -> RegistrationResult:
        """Register ``moving`` ``(B, C, *moving_spatial)`` to ``fixed`` ``(B, C, *spatial)``
        (intensities about [0, 1]) with voxel size ``spacing`` (mm per tensor axis) on
        ``device``. Without ``moving_map`` both lie on one grid (and ``moving_spacing`` is
        refused); with it, ``moving`` lies on its own grid (voxel size ``moving_spacing``;
        ``None``: ``spacing``) and ``moving_map`` ``(B, d, d + 1)`` maps fixed to moving voxel
        indices (the affine pre-alignment). :func:`check_images` checks all of these. ``fixed_mask`` and
        ``moving_mask`` ``(B, 1, *grid)`` restrict the image match. ``fixed_direction``: FIXED's
        direction cosines (row-major d×d in ITK's axis order, LPS; :attr:`hybridreg.io.Geometry.direction`),
        for solvers whose networks were trained in one orientation (``learned-lambda`` puts
        its inputs in that frame); ``None``: the tensor axes are taken to be in it already."""


def check_images(fixed: torch.Tensor, moving: torch.Tensor, *, fn: str, same_grid: bool = True,
                 fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
                 moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None) -> None:
    """Check a solver's input pair: floating-point ``(B, C, H, W)`` or ``(B, C, D, H, W)``
    tensors (float32 or float64, one dtype, one device), finite, of one shape (``same_grid``)
    or of one batch, channel and dimension count (a moving image on its own grid); a
    ``moving_map``, if given, ``(B, d, d + 1)`` and finite, and ``moving_spacing`` only with
    it (without it MOVING lies on FIXED's grid); and the masks, if given:
    ``(B or 1, 1, *spatial)`` on their image's grid, weights in [0, 1] (bool, integer 0/1 or
    float), not empty (:func:`hybridreg.spatial.check_mask`). ``fn`` names the calling
    function in the messages.

    Raises:
        TypeError: not a floating-point tensor, half precision, two dtypes or devices, or a
            mask or ``moving_map`` that is not a tensor.
        ValueError: wrong rank, a spatial axis of one voxel, NaN/Inf, different shapes, a
            malformed ``moving_map`` or a ``moving_spacing`` without it, or a mask off its
            image's grid, outside [0, 1] or empty (the message names the argument).
    """
    for name, t in (("fixed", fixed), ("moving", moving)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}(): `{name}` must be a floating-point torch.Tensor")
    check_alike(fn, fixed=fixed, moving=moving)
    for name, t in (("fixed", fixed), ("moving", moving)):
        if t.dim() not in (4, 5):
            raise ValueError(f"{fn}(): `{name}` must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(t.shape)}")
        if min(t.shape[2:]) < 2:
            raise ValueError(f"{fn}(): `{name}` needs at least 2 voxels along every spatial axis, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{fn}(): `{name}` contains NaN or Inf values")
    mismatch = fixed.shape != moving.shape if same_grid else (fixed.dim(), fixed.shape[:2]) != (moving.dim(), moving.shape[:2])
    if mismatch:
        raise ValueError(f"{fn}(): `fixed` {tuple(fixed.shape)} and `moving` {tuple(moving.shape)} must have the"
                         " same shape (or pass a `moving_map` between their grids)")
    if moving_map is not None:
        d = fixed.dim() - 2
        if not isinstance(moving_map, torch.Tensor):
            raise TypeError(f"{fn}(): `moving_map` must be a torch.Tensor, got {type(moving_map).__name__}")
        if tuple(moving_map.shape) != (fixed.shape[0], d, d + 1):
            raise ValueError(f"{fn}(): `moving_map` must be ({fixed.shape[0]}, {d}, {d + 1}) (fixed to moving voxel indices,"
                             f" hybridreg.affine.voxel_map), got {tuple(moving_map.shape)}")
        if not bool(torch.isfinite(moving_map).all()):
            raise ValueError(f"{fn}(): `moving_map` contains NaN or Inf values")
    elif moving_spacing is not None:
        raise ValueError(f"{fn}(): `moving_spacing` applies only with `moving_map` (without one, MOVING lies on FIXED's"
                         " grid, whose `spacing` it takes)")
    for name, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
        if mask is not None:
            check_mask(fn, name, mask, image.shape)


def check_result(result: Any, fixed: torch.Tensor, solver: str) -> None:
    """Check what a solver returned against :class:`RegistrationResult`'s contract before
    anything uses it (a plug-in's mistakes would otherwise surface later, in a metric or a
    figure, under another argument's name): a :class:`RegistrationResult` whose
    ``displacement`` is ``(B, d, *spatial)`` on FIXED's grid in FIXED's dtype, and
    whose tensors carry no autograd graph.

    Raises:
        ValueError: one line naming ``solver`` and the field.
    """
    where = f"--solver {solver} returned"
    if not isinstance(result, RegistrationResult):
        raise ValueError(f"{where} a {type(result).__name__}, not a hybridreg.solvers.RegistrationResult")
    disp, d = result.displacement, fixed.dim() - 2
    want = (fixed.shape[0], d, *fixed.shape[2:])
    if not isinstance(disp, torch.Tensor) or tuple(disp.shape) != want:
        raise ValueError(f"{where} a displacement of shape {tuple(getattr(disp, 'shape', ()))}: it must be {want}"
                         " (B, d, *spatial) in voxels of FIXED's grid")
    if disp.dtype != fixed.dtype:
        raise ValueError(f"{where} a {disp.dtype} displacement for {fixed.dtype} images: it must follow the inputs' dtype")
    for name in ("displacement", "velocity", "lam", "warped"):
        t = getattr(result, name)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{where} `{name}` with an autograd graph: detach it (or compute it under torch.no_grad())")


MAX_FOLDING_PERCENT = 1.0
"""A result with more folded voxels (%|J|≤0) than this has collapsed: the solvers' defaults fold
none on every bundled and real pair (0 %, README), so 1 % is far outside any success."""

FIXED_POINT_SHARE = 0.1
""":meth:`RegistrationResult.inverse_displacement`'s fixed point stops once the mean error of
``(id + D) ∘ (id + Dinv)`` is this share of the tolerance. On two real 1 mm pairs the fixed point
stopped after 3 of its 10 iterations and took about half the time (3.5–3.9 s against 7.5–8.3 s on
colin27 ← vxm). The larger mean composition error barely moved (0.0110 against 0.0105 voxels, p99
0.098 against 0.090), and the smaller rose from 0.0002 to 0.0017 voxels, far inside the 0.05
(``docs/results.md``, "Writing a 1 mm result")."""


class DivergenceError(ValueError):
    """A solver diverged or collapsed: its result must not be written as a result."""


def divergence(result: RegistrationResult, *, max_folding_percent: float = MAX_FOLDING_PERCENT) -> str | None:
    """Why ``result`` is not a registration, or ``None`` when it is one.

    A result has diverged when a stage ended with :attr:`Status.DIVERGED`, when the
    displacement, λ or the energy terms are not finite, or when more than
    ``max_folding_percent`` of the voxels fold (det J ≤ 0, central differences). The reason
    names the likely cause: the learning rates of an optimiser, or the network's weights.
    """
    from .metrics import folding_percent

    diverged = [h for h in result.history if h.status == Status.DIVERGED]
    network_only = all(not h.terms for h in result.history)  # a network pass has no iterations to log
    weights = (diverged and not diverged[0].terms) or (not diverged and network_only and result.history)
    cause = ("check the network weights (`--weights`)" if weights else
             "lower the learning rates (`lr`, `lr_lambda`) or check the hyperprior settings in --config"
             if hasattr(result.config, "lr_lambda") or hasattr(result.config, "refine_config")
             else "check the solver's settings in --config")  # a plug-in's config has no learning rates of ours
    if diverged:
        h = diverged[0]
        where = "the network's output" if weights else \
            f"the energy, on the {'x'.join(map(str, h.shape))} level after {h.iterations} iterations,"
        return f"{where} stopped being finite: {cause}"
    for name, t in (("displacement", result.displacement), ("λ", result.lam)):
        if not bool(torch.isfinite(t).all()):
            return f"the {name} is not finite (NaN/Inf): {cause}"
    bad = [k for k, v in result.final_terms.items() if not math.isfinite(v)]
    if bad:
        return f"the energy terms {bad} are not finite: {cause}"
    folded = folding_percent(result.displacement)
    if folded > max_folding_percent:
        return f"{folded:.1f}% of the voxels fold (det J <= 0; at most {max_folding_percent:g}% is a registration): {cause}"
    return None


def kept_start_warning(stage: int, stages: int, shape: Sequence[int], spacing: Sequence[float], iterations: int) -> str:
    """The line :func:`result_warnings` gives for stage ``stage`` (from 1) of ``stages`` (a
    :class:`LevelHistory`'s ``shape``, ``spacing`` in mm and ``iterations``) that kept its start."""
    return (f"stage {stage}/{stages} ({'x'.join(map(str, shape))} voxels of {'x'.join(f'{s:g}' for s in spacing)} mm)"
            f" ended above the energy it started from after {iterations} iterations, so it handed on its start:"
            " it did not descend and the finer levels went on from there; check the result")


def result_warnings(result: RegistrationResult) -> list[str]:
    """What to check in one pair's result (:meth:`RegistrationResult.pair`; a batch's is judged
    as a whole) that :func:`divergence` accepts: one line per stage of
    ``result.history`` that kept its start (:attr:`LevelHistory.kept_start`), numbered as the
    history counts its stages (learned + refine's network pass is stage 1); ``[]`` when there is
    nothing. Such a level did not descend, and the finer levels went on from its start rather
    than from its end. Otherwise, a displacement under :data:`IDENTITY_VOXELS` everywhere is one
    line too (e.g. a network whose training never moved it). The result may still be a good registration (an image against itself
    starts at the optimum): it is written, and the CLI prints these lines on stderr
    (``metrics.json`` ``warnings``).
    """
    n = len(result.history)
    lines = [kept_start_warning(k + 1, n, h.shape, h.spacing, h.iterations)
             for k, h in enumerate(result.history) if h.kept_start]
    largest = float(result.displacement.detach().abs().amax()) if result.displacement.numel() else 0.0
    if not lines and largest < IDENTITY_VOXELS:
        lines.append(f"the displacement is the identity (largest {largest:.3f} voxels): the deformable stage did not"
                     " move MOVING; a network that returns it may be untrained (a short or stalled training run)")
    return lines


IDENTITY_VOXELS = 0.05
"""A displacement whose largest component is below this many voxels is reported as the identity
(:func:`result_warnings`)."""


def synchronize(device: torch.device | str) -> None:
    """Wait until the kernels queued on ``device`` have run, so that a clock read next times
    them (a GPU runs them asynchronously); nothing on the CPU, whose operators return done.

    Raises:
        RuntimeError: ``device`` is a GPU that torch cannot reach.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_solvers() -> tuple[str, ...]:
    """Names of the installed solvers (the :data:`ENTRY_POINT_GROUP` entry points), sorted."""
    return tuple(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}))


def get_solver(name: str) -> Solver:
    """Load the solver registered as ``name`` in :data:`ENTRY_POINT_GROUP`.

    Raises:
        ValueError: no installed solver has that name (the message lists those that exist),
            two installed packages register it (one would silently replace the other, e.g. a
            plug-in named ``instance``), its entry point fails to import, or it is not an object
            satisfying :class:`Solver` (a class instead of its instance, say). Each message
            names the solver and the entry point.
    """
    found = {ep.value: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name}  # one per target
    if not found:
        names = ", ".join(available_solvers()) or "none: install hybridreg with pip"
        raise ValueError(f"`--solver` must be one of the installed solvers ({names}), got {name!r}")
    if len(found) > 1:
        raise ValueError(f"`--solver` {name!r} is registered by more than one installed package ({', '.join(sorted(found))}):"
                         " uninstall one, or rename its entry point")
    (ep,) = found.values()
    try:
        solver = ep.load()
    except Exception as e:  # noqa: BLE001 -- a plug-in's import error, reported as its own
        raise ValueError(f"`--solver` {name!r}: its entry point {ep.value} failed to load: {type(e).__name__}: {e}") from None
    if isinstance(solver, type) or not isinstance(solver, Solver):
        raise ValueError(f"`--solver` {name!r}: entry point {ep.value} is not a hybridreg.solvers.Solver"
                         f"{' (it is a class: register an instance of it)' if isinstance(solver, type) else ''}")
    return solver
