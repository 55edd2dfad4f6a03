"""Per-atom energies of local atoms only, for LAMMPS ML-IAP.

Under ML-IAP (``nequip-prepare-lmp-mliap``) a model sees local + ghost atoms (periodic images
and atoms owned by other MPI ranks; ``num_local_ghost_atoms`` = ``[n_local, n_ghost]``) and its
forces are the gradient of its total energy with respect to the edge vectors. Ghost rows
carry their owners' features (the blocks' ghost exchange), so their energies must not enter the
total: each atom's energy is counted by the rank that owns it.
"""

import torch
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin


@compile_mode("script")
class LocalAtomEnergies(GraphModuleMixin, torch.nn.Module):
    """Zero ``per_atom_energy`` ``(N, 1)`` on ghost rows (``i >= n_local``) when
    ``num_local_ghost_atoms`` is present; identity otherwise."""

    def __init__(self, irreps_in=None):
        super().__init__()
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[AtomicDataDict.PER_ATOM_ENERGY_KEY])

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if AtomicDataDict.NUM_LOCAL_GHOST_NODES_KEY in data:
            energy = data[AtomicDataDict.PER_ATOM_ENERGY_KEY]
            num_local = data[AtomicDataDict.NUM_LOCAL_GHOST_NODES_KEY][0]
            local = torch.arange(energy.size(0), device=energy.device) < num_local
            data[AtomicDataDict.PER_ATOM_ENERGY_KEY] = torch.where(
                local.unsqueeze(-1), energy, torch.zeros_like(energy)
            )
        return data
