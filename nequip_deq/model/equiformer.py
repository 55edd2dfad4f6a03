"""``EquiformerModel``: Equiformer (Liao & Smidt, ICLR 2023) as a nequip energy model."""

from typing import Dict, Optional, Sequence, Union

from e3nn.o3._irreps import Irreps

from nequip.data import AtomicDataDict
from nequip.model import model_builder
from nequip.model.energy_modules import _append_energy_modules
from nequip.nn import (
    ForceStressOutput,
    PerTypeScaleShift,
    ScalarMLP,
    SequentialGraphNetwork,
)
from nequip.nn.embedding import (
    BesselEdgeLengthEncoding,
    EdgeLengthNormalizer,
    NodeTypeEmbed,
    PolynomialCutoff,
    SphericalHarmonicEdgeAttrs,
)

from nequip_deq.nn import (
    ATTENTION_TYPES,
    EdgeDegreeEmbedding,
    EquiformerBlock,
    ExpNormalEdgeLengthEncoding,
    GaussianEdgeLengthEncoding,
)
from nequip_deq.nn.ghost_atoms import LocalAtomEnergies

RADIAL_BASES = ("gaussian", "exp_normal", "bessel")


class InvalidModelConfig(ValueError):
    """A model argument has a value the model cannot be built with."""


def parse_irreps(name: str, value) -> Irreps:
    """``value`` as sorted, simplified irreps, or an error naming the argument ``name``."""
    try:
        irreps = Irreps(value)
    except (ValueError, AssertionError, TypeError) as e:
        raise InvalidModelConfig(
            f"`{name}={value!r}` is not a valid irreps string ({e}); write it as "
            "multiplicity x (l)(parity) terms joined by '+', e.g. '128x0e+64x1o+32x2e'."
        ) from None
    if len(irreps) == 0:
        raise InvalidModelConfig(f"`{name}` is empty; give at least one irrep.")
    return irreps.sort().irreps.simplify()


def default_node_irreps(parity: bool) -> str:
    """The paper's MD17 width, with proper parities (``1o``) unless ``parity=False``."""
    return f"128x0e+64x1{'o' if parity else 'e'}+32x2e"


def check_equiformer_args(
    num_layers: int,
    l_max: int,
    parity: bool,
    irreps: Irreps,
    num_heads: int,
    attention_type: str,
    radial_basis: str,
    avg_num_neighbors,
) -> None:
    """Refuse configurations the model cannot be built with, naming the argument and fix."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InvalidModelConfig(f"`num_layers={num_layers}`: need an integer >= 1.")
    if not isinstance(l_max, int) or l_max < 1:
        raise InvalidModelConfig(
            f"`l_max={l_max}`: attention needs directional edge features, use l_max >= 1 "
            "(2 is the paper's choice)."
        )
    if attention_type not in ATTENTION_TYPES:
        raise InvalidModelConfig(
            f"`attention_type={attention_type!r}` is unknown; use one of {list(ATTENTION_TYPES)}."
        )
    if radial_basis not in RADIAL_BASES:
        raise InvalidModelConfig(
            f"`radial_basis={radial_basis!r}` is unknown; use one of {list(RADIAL_BASES)}."
        )
    if irreps.count("0e") == 0:
        raise InvalidModelConfig(
            f"`irreps_node_features={irreps}` has no 0e scalars; attention weights and the "
            "energy are computed from them, add e.g. '64x0e'."
        )
    if not isinstance(num_heads, int) or num_heads < 1:
        raise InvalidModelConfig(f"`num_heads={num_heads}`: need an integer >= 1.")
    bad = [f"{mul}x{ir}" for mul, ir in irreps if mul % num_heads != 0]
    if bad:
        raise InvalidModelConfig(
            f"`num_heads={num_heads}` does not divide the channels {bad} of "
            f"`irreps_node_features={irreps}`: every multiplicity must be a multiple of "
            "num_heads (change num_heads or the multiplicities)."
        )
    if not parity and any(ir.p == -1 for _, ir in irreps):
        raise InvalidModelConfig(
            f"`parity=False` (SE(3) only, all irreps even) but `irreps_node_features={irreps}` "
            "has odd irreps; use even irreps (e.g. '1e') or set parity=True."
        )
    if avg_num_neighbors is not None and not isinstance(avg_num_neighbors, (int, float)):
        raise InvalidModelConfig(
            f"`avg_num_neighbors={avg_num_neighbors!r}` must be one number, e.g. "
            "'${training_data_stats:num_neighbors_mean}' (per-type values are not supported)."
        )
    if avg_num_neighbors is not None and not avg_num_neighbors > 0:
        raise InvalidModelConfig(f"`avg_num_neighbors={avg_num_neighbors}` must be > 0.")


def radial_basis_module(
    radial_basis: str,
    num_basis: int,
    polynomial_cutoff_p: float,
    irreps_in,
):
    """The enveloped radial basis ``radial_basis`` (see :mod:`nequip_deq.nn.radial`)."""
    if radial_basis == "gaussian":
        return GaussianEdgeLengthEncoding(
            num_basis=num_basis, polynomial_cutoff_p=polynomial_cutoff_p, irreps_in=irreps_in
        )
    if radial_basis == "exp_normal":
        return ExpNormalEdgeLengthEncoding(
            num_basis=num_basis, polynomial_cutoff_p=polynomial_cutoff_p, irreps_in=irreps_in
        )
    return BesselEdgeLengthEncoding(
        num_bessels=num_basis,
        cutoff=PolynomialCutoff(polynomial_cutoff_p),
        irreps_in=irreps_in,
    )


def equiformer_encoder(
    r_max: float,
    type_names: Sequence[str],
    irreps: Irreps,
    l_max: int,
    parity: bool,
    radial_basis: str,
    num_basis: int,
    polynomial_cutoff_p: float,
    radial_mlp_depth: int,
    radial_mlp_width: int,
    avg_num_neighbors: Optional[float],
    extra_inputs: Optional[Dict[str, object]] = None,
) -> Dict[str, object]:
    """Modules that run once per structure: type embedding, spherical harmonics, enveloped
    radial basis, edge-degree embedding. Returns them in order, ``node_features = X``.
    ``extra_inputs`` (field: irreps) declares further model inputs (nequip passes a model only
    the fields its first module declares)."""
    type_embed = NodeTypeEmbed(
        type_names=type_names, num_features=irreps.count("0e"), irreps_in=extra_inputs
    )
    spharm = SphericalHarmonicEdgeAttrs(
        irreps_edge_sh=Irreps.spherical_harmonics(l_max, p=-1 if parity else 1),
        irreps_in=type_embed.irreps_out,
    )
    edge_norm = EdgeLengthNormalizer(
        r_max=r_max, type_names=type_names, irreps_in=spharm.irreps_out
    )
    radial = radial_basis_module(
        radial_basis, num_basis, polynomial_cutoff_p, edge_norm.irreps_out
    )
    degree = EdgeDegreeEmbedding(
        irreps_node=irreps,
        avg_num_neighbors=avg_num_neighbors,
        radial_mlp_depth=radial_mlp_depth,
        radial_mlp_width=radial_mlp_width,
        irreps_in=radial.irreps_out,
    )
    return {
        "type_embed": type_embed,
        "spharm": spharm,
        "edge_norm": edge_norm,
        "radial_basis": radial,
        "edge_degree_embed": degree,
    }


def energy_readout(
    type_names: Sequence[str],
    irreps_in,
    readout_mlp_width: int,
    per_type_energy_scales,
    per_type_energy_shifts,
    per_type_energy_scales_trainable: bool,
    per_type_energy_shifts_trainable: bool,
) -> Dict[str, object]:
    """Per-atom energy MLP (scalar features -> 1) followed by per-type scale and shift (and,
    under LAMMPS ML-IAP, zero energies on ghost atoms: :mod:`~nequip_deq.nn.ghost_atoms`)."""
    readout = ScalarMLP(
        output_dim=1,
        hidden_layers_depth=1,
        hidden_layers_width=readout_mlp_width,
        nonlinearity="silu",
        bias=False,
        field=AtomicDataDict.NODE_FEATURES_KEY,
        out_field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        irreps_in=irreps_in,
    )
    scale_shift = PerTypeScaleShift(
        type_names=type_names,
        field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        out_field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        scales=per_type_energy_scales,
        shifts=per_type_energy_shifts,
        scales_trainable=per_type_energy_scales_trainable,
        shifts_trainable=per_type_energy_shifts_trainable,
        irreps_in=readout.irreps_out,
    )
    local_only = LocalAtomEnergies(irreps_in=scale_shift.irreps_out)
    return {
        "per_atom_energy_readout": readout,
        "per_type_energy_scale_shift": scale_shift,
        "local_atom_energies": local_only,
    }


@model_builder
def EquiformerModel(
    r_max: float,
    type_names: Sequence[str],
    num_layers: int = 6,
    l_max: int = 2,
    parity: bool = True,
    irreps_node_features: Optional[str] = None,
    num_heads: int = 4,
    attention_type: str = "mlp",
    nonlinear_messages: bool = True,
    alpha_channels: int = 0,
    ffn_multiplier: int = 3,
    num_output_features: int = 512,
    radial_basis: str = "gaussian",
    num_basis: int = 32,
    polynomial_cutoff_p: float = 6.0,
    radial_mlp_depth: int = 2,
    radial_mlp_width: int = 64,
    readout_mlp_width: Optional[int] = None,
    avg_num_neighbors: Optional[float] = None,
    per_type_energy_scales: Optional[Union[float, Sequence[float]]] = None,
    per_type_energy_shifts: Optional[Union[float, Sequence[float]]] = None,
    per_type_energy_scales_trainable: bool = False,
    per_type_energy_shifts_trainable: bool = False,
    pair_potential: Optional[Dict] = None,
    do_derivatives: bool = True,
):
    """Equiformer: an SE(3)/E(3)-equivariant graph-attention transformer for energies,
    forces (−dE/dx) and stress. Defaults are the paper's MD17 model (6 blocks,
    ``128x0e+64x1o+32x2e``, ``l_max=2``, 4 heads, MLP attention, non-linear messages,
    32 radial functions, output block ``512x0e``), with a smooth cutoff and proper parities.

    Args:
        seed (int): seed for reproducibility
        model_dtype (str): ``float32`` or ``float64``
        r_max (float): cutoff radius (Å); all edge contributions and attention weights go
            smoothly to zero there
        type_names (List[str]): atom type names
        num_layers (int): transformer blocks; the last one outputs scalars only (default 6)
        l_max (int): maximum degree of the edge spherical harmonics, >= 1 (default 2)
        parity (bool): use proper parities (``1o``, ``2e``): E(3)-equivariant, mirror images
            get equal energies. ``False`` gives the published SE(3)-only model with all-even
            irreps (default ``True``)
        irreps_node_features (str): node feature irreps, e.g. ``128x0e+64x1o+32x2e``
            (default: that, or ``...1e...`` with ``parity=False``)
        num_heads (int): attention heads; must divide every multiplicity (default 4)
        attention_type (str): ``mlp`` (the paper's default) or ``dot_product``
        nonlinear_messages (bool): gate + second depth-wise tensor product on the values
            (about 2x the cost of linear messages; default ``True``)
        alpha_channels (int): MLP-attention logit channels per head (default ``0``: the
            number of ``0e`` channels per head)
        ffn_multiplier (int): feed-forward hidden width as a multiple of the feature
            multiplicities (default 3)
        num_output_features (int): scalar features of the output block (default 512)
        radial_basis (str): ``gaussian`` (default), ``exp_normal`` or ``bessel``
        num_basis (int): radial basis size (default 32)
        polynomial_cutoff_p (float): exponent of the polynomial cutoff envelope (default 6)
        radial_mlp_depth (int): hidden layers of the radial MLPs (default 2)
        radial_mlp_width (int): width of the radial MLPs (default 64)
        readout_mlp_width (int): hidden width of the energy readout MLP
            (default ``num_output_features``)
        avg_num_neighbors (float): normaliser of the edge-degree embedding, usually
            ``${training_data_stats:num_neighbors_mean}``
        per_type_energy_scales, per_type_energy_shifts: per-type scale and shift of the
            per-atom energies (as in nequip's models)
        per_type_energy_scales_trainable, per_type_energy_shifts_trainable (bool)
        pair_potential (dict): optional pair potential, e.g. ``nequip.nn.pair_potential.ZBL``
        do_derivatives (bool): compute forces (and stress with a cell) by autograd
    """
    irreps = parse_irreps(
        "irreps_node_features",
        irreps_node_features if irreps_node_features is not None else default_node_irreps(parity),
    )
    check_equiformer_args(
        num_layers, l_max, parity, irreps, num_heads, attention_type, radial_basis,
        avg_num_neighbors,
    )
    if num_output_features < 1:
        raise InvalidModelConfig(f"`num_output_features={num_output_features}` must be >= 1.")

    modules = equiformer_encoder(
        r_max, type_names, irreps, l_max, parity, radial_basis, num_basis,
        polynomial_cutoff_p, radial_mlp_depth, radial_mlp_width, avg_num_neighbors,
    )
    prev = modules["edge_degree_embed"].irreps_out
    for layer in range(num_layers):
        last = layer == num_layers - 1
        block = EquiformerBlock(
            num_heads=num_heads,
            attention_type=attention_type,
            nonlinear_messages=nonlinear_messages,
            alpha_channels=alpha_channels,
            radial_mlp_depth=radial_mlp_depth,
            radial_mlp_width=radial_mlp_width,
            ffn_multiplier=ffn_multiplier,
            irreps_out=f"{num_output_features}x0e" if last else None,
            output_norm=last,
            irreps_in=prev,
        )
        modules[f"block{layer}"] = block
        prev = block.irreps_out

    modules.update(
        energy_readout(
            type_names,
            prev,
            readout_mlp_width or num_output_features,
            per_type_energy_scales,
            per_type_energy_shifts,
            per_type_energy_scales_trainable,
            per_type_energy_shifts_trainable,
        )
    )
    energy_model = _append_energy_modules(
        SequentialGraphNetwork(modules), type_names=type_names, pair_potential=pair_potential
    )
    return ForceStressOutput(energy_model, do_derivatives)
