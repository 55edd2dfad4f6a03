"""``EquiformerModel``: Equiformer (Liao & Smidt, ICLR 2023) as a nequip energy model."""

from nequip.model import model_builder

from .architecture import EquiformerArchitecture, InvalidModelConfig, with_architecture_args


@model_builder
@with_architecture_args
def EquiformerModel(num_layers: int = 6, **kwargs):
    """Equiformer: an SE(3)/E(3)-equivariant graph-attention transformer for energies,
    forces (−dE/dx) and stress. Defaults are the paper's MD17 model (6 blocks,
    ``128x0e+64x1o+32x2e``, ``l_max=2``, 4 heads, MLP attention, non-linear messages,
    32 radial functions, output block ``512x0e``), with a smooth cutoff and proper parities.

    Args:
        num_layers (int): transformer blocks; the last one outputs scalars only (default 6)
    """
    arch = EquiformerArchitecture.from_kwargs("EquiformerModel", kwargs, EquiformerModel.builder_args)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InvalidModelConfig(f"`num_layers={num_layers}`: need an integer >= 1.")
    modules = arch.encoder()
    prev = modules["edge_degree_embed"].irreps_out
    for layer in range(num_layers - 1):
        block = arch.block(prev)
        modules[f"block{layer}"] = block
        prev = block.irreps_out
    modules[f"block{num_layers - 1}"] = arch.output_block(prev)
    modules.update(arch.energy_readout(modules[f"block{num_layers - 1}"].irreps_out))
    return arch.energy_model(modules)
