"""nequip-deq: Equiformer-style equivariant graph attention and deep-equilibrium models for
NequIP. Imported by nequip at start-up (``nequip.extension`` entry point): keep this light,
builders live in :mod:`nequip_deq.model`."""

from ._version import __version__
from . import _resolvers, _fields, _compile_targets

__all__ = ["__version__", "_resolvers", "_fields", "_compile_targets"]
