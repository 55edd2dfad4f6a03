"""Deploy-time settings of a DEQ layer: the metadata a compiled model records (state width,
solver limits, state cache) and the model modifiers that change a trained model for
deployment, ``enable_DEQStateCache`` and ``set_DEQSolverTolerances``.

Both modifiers are persistent (they change the model's outputs, within the solver tolerance),
so ``nequip-package modify`` applies them with arguments to a packaged model, which is then
compiled; ``nequip-compile --modifiers`` applies them with their defaults only (it passes no
arguments)::

    nequip-package build best.ckpt deq.nequip.zip
    nequip-package modify deq.nequip.zip deq_md.nequip.zip \\
        --modifier enable_DEQStateCache capacity=2000 \\
        --modifier set_DEQSolverTolerances f_tol=1e-3 b_tol=1e-3
    nequip-compile deq_md.nequip.zip deq.nequip.pt2 --mode aotinductor --target pair_nequip_deq
"""

import logging
import math
from typing import Dict, Optional

import torch

from nequip.nn.model_modifier_utils import model_modifier, replace_submodules

from ..._compile_targets import (
    DAMPING_METADATA_KEY,
    FIXED_POINT_METADATA_KEY,
    SOLVER_METADATA_KEYS,
    STATE_CACHE_BYTES_METADATA_KEY,
    STATE_CACHE_EXTRAPOLATION_METADATA_KEY,
    STATE_CACHE_METADATA_KEY,
    STATE_WIDTH_METADATA_KEY,
    announce_to_compile_targets,
)
from .extrapolation import DEFAULT_SCHEME
from .solvers import tolerance_floor
from .state_cache import CACHE_SCHEMES, DEFAULT_CAPACITY, DEFAULT_MAX_DISPLACEMENT, DEQStateCache


def _positive_number(value, whole: bool) -> Optional[float]:
    """``value`` as a number > 0 (a whole one if ``whole``), or ``None`` if it is not one.
    Strings are read as numbers: nequip-package modify's ``key=value`` arguments are YAML,
    which reads ``1e-3`` as a string."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not number > 0 or (whole and not (math.isfinite(number) and number == int(number))):
        return None
    return number


class DEQDeployment:
    """Mixin of :class:`~nequip_deq.nn.fixed_point.layer.DEQEquiformerLayer`: its metadata and its
    deploy-time model modifiers (they replace every DEQ layer of a model)."""

    @torch.jit.unused
    def _get_metadata_contributions(self) -> Dict[str, str]:
        # the state width lets a calculator give a compiled model a cold-start state; it and
        # the cache capacity tell the compile targets what they trace (read before tracing)
        width = self.injection.norm.irreps.dim
        announce_to_compile_targets(width, self.state_cache.capacity, self.variational)
        out = {
            STATE_WIDTH_METADATA_KEY: str(width),
            FIXED_POINT_METADATA_KEY: "variational" if self.variational else "lagrangian",
            DAMPING_METADATA_KEY: str(self.damping),
        }
        floor = tolerance_floor(next(self.parameters()).dtype)
        settings = (max(self.f_tol, floor), self.f_max_iter, max(self.b_tol, floor), self.b_max_iter)
        out.update({k: str(v) for k, v in zip(SOLVER_METADATA_KEYS, settings)})
        if self.state_cache.capacity > 0:
            out[STATE_CACHE_METADATA_KEY] = str(self.state_cache.capacity)
            out[STATE_CACHE_BYTES_METADATA_KEY] = str(self.state_cache.nbytes())
            out[STATE_CACHE_EXTRAPOLATION_METADATA_KEY] = self.state_cache.extrapolation
        return out

    @model_modifier(persistent=True)
    @classmethod
    def enable_DEQStateCache(
        cls,
        model: torch.nn.Module,
        capacity: int = DEFAULT_CAPACITY,
        max_displacement: float = DEFAULT_MAX_DISPLACEMENT,
        extrapolation: str = DEFAULT_SCHEME,
    ) -> torch.nn.Module:
        """Keep the last fixed points inside the model and warm-start the next call from them
        when it is the same system a moment later (:mod:`~nequip_deq.nn.fixed_point.state_cache`): for
        callers that pass no state, such as LAMMPS ``pair_style nequip``. ``capacity`` (atoms)
        bounds the systems that profit; larger ones run cold. ``extrapolation``: the starting
        point, ``xlbomd`` or ``quadratic`` (:mod:`~nequip_deq.nn.fixed_point.extrapolation`).

        With the defaults: ``nequip-compile ... --modifiers enable_DEQStateCache``. With
        arguments (nequip-compile passes none), on a packaged model before compiling it:
        ``nequip-package modify in.nequip.zip out.nequip.zip --modifier enable_DEQStateCache
        capacity=2000 extrapolation=quadratic``."""
        if _positive_number(capacity, whole=True) is None:
            raise ValueError(
                f"enable_DEQStateCache: capacity {capacity} must be a whole number of atoms >= 1 "
                "(the largest system you run)."
            )
        if extrapolation not in CACHE_SCHEMES:
            raise ValueError(
                f"enable_DEQStateCache: extrapolation {extrapolation!r}: choose one of "
                f"{list(CACHE_SCHEMES)}."
            )

        def factory(layer: torch.nn.Module) -> torch.nn.Module:
            old = layer.state_cache
            layer.state_cache = DEQStateCache(
                int(float(capacity)), old.width, old.states.dtype, max_displacement, extrapolation
            ).to(old.states.device)
            logging.getLogger(__name__).info(
                f"{layer.state_cache.describe()} Size it to the largest system you run "
                "(`nequip-package modify ... --modifier enable_DEQStateCache capacity=<atoms>`)."
            )
            return layer

        return replace_submodules(model, cls, factory)

    @model_modifier(persistent=True)
    @classmethod
    def set_DEQSolverTolerances(
        cls,
        model: torch.nn.Module,
        f_tol: Optional[float] = None,
        b_tol: Optional[float] = None,
        f_max_iter: Optional[int] = None,
        b_max_iter: Optional[int] = None,
    ) -> torch.nn.Module:
        """Deploy-time solver settings: the forward and adjoint tolerances and iteration caps
        of a trained model (arguments left out are kept; training settings are unchanged in
        the checkpoint). For a compiled model, on its package before compiling it:
        ``nequip-package modify in.nequip.zip out.nequip.zip --modifier
        set_DEQSolverTolerances f_tol=1e-3 b_tol=1e-3``. The compiled model records the result
        in its metadata (``deq_f_tol`` ...), where ``DEQCalculator``, ``nequip-deq-md`` and
        ``nequip-deq-lammps-check`` read it. docs/deq.md tabulates NVE drift and cost against
        the tolerance."""
        given = {"f_tol": f_tol, "b_tol": b_tol, "f_max_iter": f_max_iter, "b_max_iter": b_max_iter}
        settings = {}
        for name, value in given.items():
            if value is None:
                continue
            whole = name.endswith("max_iter")
            number = _positive_number(value, whole)
            if number is None:
                what = "a whole number > 0" if whole else "a number > 0"
                raise ValueError(f"set_DEQSolverTolerances: {name} = {value!r} must be {what}.")
            settings[name] = int(number) if whole else number
        if not settings:
            raise ValueError(
                "set_DEQSolverTolerances got no setting: pass f_tol, b_tol, f_max_iter and/or "
                "b_max_iter (`--modifier set_DEQSolverTolerances f_tol=1e-3` with "
                "nequip-package modify)."
            )

        def factory(layer: torch.nn.Module) -> torch.nn.Module:
            for name, value in settings.items():
                setattr(layer, name, value)
            return layer

        return replace_submodules(model, cls, factory)
