"""The argument list shared by :func:`~nequip_deq.model.EquiformerModel` and
:func:`~nequip_deq.model.DEQEquiformerModel`, validated once, and the model parts built from it
(encoder, blocks, energy readout, forces/stress)."""

import inspect
import warnings
from typing import Dict, Optional, Sequence, Union

from e3nn.o3._irreps import Irreps

from nequip.data import AtomicDataDict
from nequip.model.energy_modules import _append_energy_modules
from nequip.nn import ForceStressOutput, PerTypeScaleShift, ScalarMLP, SequentialGraphNetwork
from nequip.nn.embedding import (
    BesselEdgeLengthEncoding,
    EdgeLengthNormalizer,
    NodeTypeEmbed,
    PolynomialCutoff,
    SphericalHarmonicEdgeAttrs,
)

from nequip_deq.nn import (
    ATTENTION_TYPES,
    BLOCK_TYPES,
    EdgeDegreeEmbedding,
    EquiformerBlock,
    ExpNormalEdgeLengthEncoding,
    GaussianEdgeLengthEncoding,
)
from nequip_deq.nn.ghost_atoms import LocalAtomEnergies

RADIAL_BASES = ("gaussian", "exp_normal", "bessel")
# the arguments that only one block type reads
BLOCK_TYPE_ARGS = {
    "v1": ("attention_type", "nonlinear_messages"),
    "v2": ("m_max", "attention_renorm", "hidden_channels", "s2_activation"),
}

ARCHITECTURE_ARGS = """
    Architecture arguments, shared by ``EquiformerModel`` and ``DEQEquiformerModel``:

    Args:
        seed (int): seed for reproducibility
        model_dtype (str): ``float32`` or ``float64``
        r_max (float): cutoff radius (Å); all edge contributions and attention weights go
            smoothly to zero there
        type_names (List[str]): atom type names
        l_max (int): maximum degree of the edge spherical harmonics, >= 1 (default 2)
        parity (bool): use proper parities (``1o``, ``2e``): E(3)-equivariant, mirror images
            get equal energies. ``False`` gives the published SE(3)-only model with all-even
            irreps (default ``True``)
        irreps_node_features (str): node feature irreps, e.g. ``128x0e+64x1o+32x2e``
            (default: that, or ``...1e...`` with ``parity=False``)
        num_heads (int): attention heads; must divide every multiplicity (default 4)
        block_type (str): ``v1``: Equiformer's attention with depth-wise tensor products
            (default); ``v2``: EquiformerV2's, SO(2) convolutions in each edge's frame (cost
            O(l_max^3) instead of O(l_max^6)); v2 needs the same multiplicity for every degree
            0..l_max, e.g. ``64x0e+64x1o+64x2e+64x3o``
        attention_type (str): v1: ``mlp`` (the paper's default) or ``dot_product``
        nonlinear_messages (bool): v1: gate + second depth-wise tensor product on the values
            (about 2x the cost of linear messages; default ``True``)
        alpha_channels (int): MLP-attention logit channels per head (default ``0``: the
            number of ``0e`` channels per head)
        m_max (int): v2: largest order kept in the edge frames, 1..l_max (default
            ``min(2, l_max)``)
        attention_renorm (bool): v2: layer norm on the attention logits (default ``True``)
        hidden_channels (int): v2: channels between the two SO(2) convolutions (default ``0``:
            the multiplicity)
        separable_layer_norm (bool): one variance for all degrees l > 0 (EquiformerV2's
            layer norm) instead of one per degree (default: each paper's choice, ``True`` for
            v2 blocks, ``False`` for v1)
        s2_activation (bool): v2: EquiformerV2's separable S2 activation (SiLU on a grid on
            the sphere) in the feed-forward networks instead of a gate; equivariant only up to
            the grid's aliasing error (rotated forces of small test models differ by 1e-6 eV/Å
            at l_max 2, 1e-4 at l_max 4), hence off by default (the published model's is on)
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


class InvalidModelConfig(ValueError):
    """A model argument has a value the model cannot be built with."""


def with_architecture_args(builder):
    """Give a builder that takes the architecture arguments as ``**kwargs`` their
    documentation (:data:`ARCHITECTURE_ARGS`, appended to its docstring) and their signature:
    ``inspect.signature`` and ``help()`` show the builder's own arguments (kept in
    ``builder.builder_args``) followed by every architecture argument (keyword-only) with its
    default."""
    builder.__doc__ = (builder.__doc__ or "") + ARCHITECTURE_ARGS
    own = [p for p in inspect.signature(builder).parameters.values() if p.kind != p.VAR_KEYWORD]
    shared = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(EquiformerArchitecture.__init__).parameters.items()
        if name != "self"
    ]
    builder.__signature__ = inspect.Signature(own + shared)
    builder.builder_args = tuple(p.name for p in own)
    return builder


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


class EquiformerArchitecture:
    """Validated architecture arguments (:data:`ARCHITECTURE_ARGS`) and the parts built from
    them. :meth:`from_kwargs` turns a builder's ``**kwargs`` into one, with unknown
    arguments refused by name."""

    def __init__(
        self,
        r_max: float,
        type_names: Sequence[str],
        l_max: int = 2,
        parity: bool = True,
        irreps_node_features: Optional[str] = None,
        num_heads: int = 4,
        block_type: str = "v1",
        attention_type: str = "mlp",
        nonlinear_messages: bool = True,
        alpha_channels: int = 0,
        m_max: Optional[int] = None,
        attention_renorm: bool = True,
        hidden_channels: int = 0,
        separable_layer_norm: Optional[bool] = None,
        s2_activation: bool = False,
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
        default = f"128x0e+64x1{'o' if parity else 'e'}+32x2e"  # the paper's MD17 width
        if block_type == "v2":  # DEQuify's MD17 width: 64 channels for every degree
            default = "+".join(f"64x{l}{'eo'[l % 2] if parity else 'e'}" for l in range(l_max + 1))
        self.irreps = parse_irreps(
            "irreps_node_features",
            irreps_node_features if irreps_node_features is not None else default,
        )
        self.r_max = r_max
        self.type_names = list(type_names)
        self.l_max = l_max
        self.parity = parity
        self.num_heads = num_heads
        self.block_type = block_type
        self.attention_type = attention_type
        self.nonlinear_messages = nonlinear_messages
        self.alpha_channels = alpha_channels
        self.m_max = min(2, l_max) if m_max is None and isinstance(l_max, int) else m_max
        self.attention_renorm = attention_renorm
        self.hidden_channels = hidden_channels
        if separable_layer_norm is None:  # each paper's layer norm
            separable_layer_norm = block_type == "v2"
        self.separable_layer_norm = separable_layer_norm
        self.s2_activation = s2_activation
        self.ffn_multiplier = ffn_multiplier
        self.num_output_features = num_output_features
        self.radial_basis = radial_basis
        self.num_basis = num_basis
        self.polynomial_cutoff_p = polynomial_cutoff_p
        self.radial_mlp_depth = radial_mlp_depth
        self.radial_mlp_width = radial_mlp_width
        self.readout_mlp_width = readout_mlp_width or num_output_features
        self.avg_num_neighbors = avg_num_neighbors
        self.per_type_energy_scales = per_type_energy_scales
        self.per_type_energy_shifts = per_type_energy_shifts
        self.per_type_energy_scales_trainable = per_type_energy_scales_trainable
        self.per_type_energy_shifts_trainable = per_type_energy_shifts_trainable
        self.pair_potential = pair_potential
        self.do_derivatives = do_derivatives
        self._check()

    @classmethod
    def from_kwargs(cls, builder: str, kwargs: Dict, builder_args: Sequence[str] = ()) -> "EquiformerArchitecture":
        """The architecture of ``builder`` from its ``**kwargs``. Refused: unknown arguments
        (named, with every argument the builder takes: ``builder_args`` and the architecture's)
        and arguments of the other block type with a value that would change that block type
        (the blocks built would ignore them); warned about: those at their default value."""
        signature = inspect.signature(cls.__init__).parameters
        allowed = [p for p in signature if p != "self"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            hint = (
                " (a DEQ has `num_deq_layers` weight-tied blocks instead of `num_layers`)"
                if "num_layers" in unknown
                else ""
            )
            own = f"its own arguments are {list(builder_args)}, " if builder_args else ""
            raise InvalidModelConfig(
                f"{builder} got unknown arguments {unknown}{hint}; {own}its architecture "
                f"arguments are {allowed} (see help({builder}))."
            )
        block_type = kwargs.get("block_type", signature["block_type"].default)
        others = [t for t in BLOCK_TYPE_ARGS if t != block_type] if block_type in BLOCK_TYPE_ARGS else []
        for other in others:
            for name in [n for n in BLOCK_TYPE_ARGS[other] if n in kwargs]:
                if kwargs[name] != signature[name].default:
                    raise InvalidModelConfig(
                        f"`{name}={kwargs[name]!r}` applies to {other} blocks only; the "
                        f"`block_type={block_type}` blocks would ignore it: remove it or set "
                        f"`block_type: {other}`."
                    )
                warnings.warn(
                    f"`{name}` applies to {other} blocks only and has no effect with "
                    f"`block_type={block_type}`; remove it from the model arguments."
                )
        return cls(**kwargs)

    def _check(self) -> None:
        """Refuse configurations the model cannot be built with, naming the argument and fix."""
        irreps = self.irreps
        if not isinstance(self.l_max, int) or self.l_max < 1:
            raise InvalidModelConfig(
                f"`l_max={self.l_max}`: attention needs directional edge features, use "
                "l_max >= 1 (2 is the paper's choice)."
            )
        if self.block_type not in BLOCK_TYPES:
            raise InvalidModelConfig(
                f"`block_type={self.block_type!r}` is unknown; use one of {list(BLOCK_TYPES)}."
            )
        if self.block_type == "v2":
            self._check_v2()
        if self.attention_type not in ATTENTION_TYPES:
            raise InvalidModelConfig(
                f"`attention_type={self.attention_type!r}` is unknown; use one of "
                f"{list(ATTENTION_TYPES)}."
            )
        if self.radial_basis not in RADIAL_BASES:
            raise InvalidModelConfig(
                f"`radial_basis={self.radial_basis!r}` is unknown; use one of "
                f"{list(RADIAL_BASES)}."
            )
        if irreps.count("0e") == 0:
            raise InvalidModelConfig(
                f"`irreps_node_features={irreps}` has no 0e scalars; attention weights and the "
                "energy are computed from them, add e.g. '64x0e'."
            )
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise InvalidModelConfig(f"`num_heads={self.num_heads}`: need an integer >= 1.")
        bad = [f"{mul}x{ir}" for mul, ir in irreps if mul % self.num_heads != 0]
        if bad:
            raise InvalidModelConfig(
                f"`num_heads={self.num_heads}` does not divide the channels {bad} of "
                f"`irreps_node_features={irreps}`: every multiplicity must be a multiple of "
                "num_heads (change num_heads or the multiplicities)."
            )
        if not self.parity and any(ir.p == -1 for _, ir in irreps):
            raise InvalidModelConfig(
                f"`parity=False` (SE(3) only, all irreps even) but `irreps_node_features="
                f"{irreps}` has odd irreps; use even irreps (e.g. '1e') or set parity=True."
            )
        n = self.avg_num_neighbors
        if n is not None and not isinstance(n, (int, float)):
            raise InvalidModelConfig(
                f"`avg_num_neighbors={n!r}` must be one number, e.g. "
                "'${training_data_stats:num_neighbors_mean}' (per-type values are not supported)."
            )
        if n is not None and not n > 0:
            raise InvalidModelConfig(f"`avg_num_neighbors={n}` must be > 0.")
        if self.num_output_features < 1:
            raise InvalidModelConfig(
                f"`num_output_features={self.num_output_features}` must be >= 1."
            )

    def _check_v2(self) -> None:
        """EquiformerV2 blocks work on sphere arrays: one multiplicity for every degree
        0..l_max, natural parity (or all even without parity), 1 <= m_max <= l_max."""
        irreps = self.irreps
        mul = irreps[0].mul
        p = -1 if self.parity else 1
        expected = Irreps([(mul, (l, p**l)) for l in range(self.l_max + 1)])
        if irreps != expected:
            raise InvalidModelConfig(
                f"`block_type=v2` needs the same multiplicity for every degree 0..l_max="
                f"{self.l_max}, one irrep each, but `irreps_node_features={irreps}`; use e.g. "
                f"`{expected}`."
            )
        if not isinstance(self.m_max, int) or not 1 <= self.m_max <= self.l_max:
            raise InvalidModelConfig(
                f"`m_max={self.m_max}` must be an integer in 1..l_max={self.l_max} (2 is the "
                "paper's choice)."
            )

    # ---- parts -----------------------------------------------------------------------

    def _radial_basis(self, irreps_in):
        """The enveloped radial basis ``radial_basis`` (see :mod:`nequip_deq.nn.radial`)."""
        if self.radial_basis == "gaussian":
            return GaussianEdgeLengthEncoding(
                num_basis=self.num_basis,
                polynomial_cutoff_p=self.polynomial_cutoff_p,
                irreps_in=irreps_in,
            )
        if self.radial_basis == "exp_normal":
            return ExpNormalEdgeLengthEncoding(
                num_basis=self.num_basis,
                polynomial_cutoff_p=self.polynomial_cutoff_p,
                irreps_in=irreps_in,
            )
        return BesselEdgeLengthEncoding(
            num_bessels=self.num_basis,
            cutoff=PolynomialCutoff(self.polynomial_cutoff_p),
            irreps_in=irreps_in,
        )

    def encoder(self, extra_inputs: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        """Modules that run once per structure: type embedding, spherical harmonics, enveloped
        radial basis, edge-degree embedding. Returns them in order, ``node_features = X``.
        ``extra_inputs`` (field: irreps) declares further model inputs (nequip passes a model
        only the fields its first module declares)."""
        type_embed = NodeTypeEmbed(
            type_names=self.type_names,
            num_features=self.irreps.count("0e"),
            irreps_in=extra_inputs,
        )
        spharm = SphericalHarmonicEdgeAttrs(
            irreps_edge_sh=Irreps.spherical_harmonics(self.l_max, p=-1 if self.parity else 1),
            irreps_in=type_embed.irreps_out,
        )
        edge_norm = EdgeLengthNormalizer(
            r_max=self.r_max, type_names=self.type_names, irreps_in=spharm.irreps_out
        )
        radial = self._radial_basis(edge_norm.irreps_out)
        degree = EdgeDegreeEmbedding(
            irreps_node=self.irreps,
            avg_num_neighbors=self.avg_num_neighbors,
            radial_mlp_depth=self.radial_mlp_depth,
            radial_mlp_width=self.radial_mlp_width,
            irreps_in=radial.irreps_out,
        )
        return {
            "type_embed": type_embed,
            "spharm": spharm,
            "edge_norm": edge_norm,
            "radial_basis": radial,
            "edge_degree_embed": degree,
        }

    def block_kwargs(self) -> Dict[str, object]:
        """Arguments of :class:`~nequip_deq.nn.EquiformerBlock` shared by every block."""
        return dict(
            num_heads=self.num_heads,
            block_type=self.block_type,
            attention_type=self.attention_type,
            nonlinear_messages=self.nonlinear_messages,
            alpha_channels=self.alpha_channels,
            m_max=self.m_max,
            attention_renorm=self.attention_renorm,
            hidden_channels=self.hidden_channels,
            separable_layer_norm=self.separable_layer_norm,
            s2_activation=self.s2_activation,
            radial_mlp_depth=self.radial_mlp_depth,
            radial_mlp_width=self.radial_mlp_width,
            ffn_multiplier=self.ffn_multiplier,
        )

    def block(self, irreps_in, **extra) -> EquiformerBlock:
        """An Equiformer block on ``X`` (``extra``: further block arguments)."""
        return EquiformerBlock(irreps_in=irreps_in, **self.block_kwargs(), **extra)

    def output_block(self, irreps_in) -> EquiformerBlock:
        """The last block: to ``num_output_features`` scalars, with a final layer norm."""
        return self.block(irreps_in, irreps_out=f"{self.num_output_features}x0e", output_norm=True)

    def energy_readout(self, irreps_in) -> Dict[str, object]:
        """Per-atom energy MLP (scalar features -> 1) followed by per-type scale and shift
        (and, under LAMMPS ML-IAP, zero energies on ghost atoms:
        :mod:`~nequip_deq.nn.ghost_atoms`)."""
        readout = ScalarMLP(
            output_dim=1,
            hidden_layers_depth=1,
            hidden_layers_width=self.readout_mlp_width,
            nonlinearity="silu",
            bias=False,
            field=AtomicDataDict.NODE_FEATURES_KEY,
            out_field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
            irreps_in=irreps_in,
        )
        scale_shift = PerTypeScaleShift(
            type_names=self.type_names,
            field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
            out_field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
            scales=self.per_type_energy_scales,
            shifts=self.per_type_energy_shifts,
            scales_trainable=self.per_type_energy_scales_trainable,
            shifts_trainable=self.per_type_energy_shifts_trainable,
            irreps_in=readout.irreps_out,
        )
        local_only = LocalAtomEnergies(irreps_in=scale_shift.irreps_out)
        return {
            "per_atom_energy_readout": readout,
            "per_type_energy_scale_shift": scale_shift,
            "local_atom_energies": local_only,
        }

    def energy_model(self, modules: Dict[str, object]) -> ForceStressOutput:
        """The modules as one energy model (plus the optional pair potential), with forces
        and stress by autograd."""
        energy_model = _append_energy_modules(
            SequentialGraphNetwork(modules),
            type_names=self.type_names,
            pair_potential=self.pair_potential,
        )
        return ForceStressOutput(energy_model, self.do_derivatives)
