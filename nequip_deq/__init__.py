"""nequip-deq: Equiformer-style equivariant graph attention and deep-equilibrium models for
NequIP. Imported by nequip at start-up (``nequip.extension`` entry point): keep this light,
builders live in :mod:`nequip_deq.model`."""

from ._version import __version__
from . import _resolvers, _fields, _compile_targets  # noqa: F401 (registrations)

from nequip.scripts._package_utils import register_libraries_as_external_for_packaging

# torchdeq serves training only (Anderson / Broyden solvers, the Jacobian penalty): a packaged
# model (nequip-package) records its imports as mocks, so it loads and runs without torchdeq,
# and fails with torch.package's message only if such a training feature is used from it
register_libraries_as_external_for_packaging(mock_modules=["torchdeq"])

__all__ = ["__version__"]  # the private modules are imported for their registrations only
