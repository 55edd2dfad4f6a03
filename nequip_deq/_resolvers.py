"""OmegaConf resolvers that nequip-deq configs use.

``${nequip_deq_data:NAME}`` is the path of a data file bundled with the package
(``nequip_deq/data/bundled/NAME``), so configs work from any directory.
"""

from pathlib import Path

from omegaconf import OmegaConf

BUNDLED_DATA_DIR = Path(__file__).parent / "data" / "bundled"


def bundled_data_path(name: str) -> str:
    path = BUNDLED_DATA_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in BUNDLED_DATA_DIR.glob("*.npz"))
        raise FileNotFoundError(
            f"`${{nequip_deq_data:{name}}}`: no bundled data file `{name}`; "
            f"bundled files are {available}"
        )
    return str(path)


if not OmegaConf.has_resolver("nequip_deq_data"):
    OmegaConf.register_new_resolver("nequip_deq_data", bundled_data_path)
