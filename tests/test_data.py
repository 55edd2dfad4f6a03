"""rMD17 / MD17 npz ingestion: unit conversion, round trips, split protocol, bad files."""

from pathlib import Path

import numpy as np

import pytest
import torch
from ase.io import write

from nequip.data import AtomicDataDict
from nequip.data.dataset import ASEDataset

from nequip_deq._resolvers import bundled_data_path
from nequip_deq.data import (
    InvalidDataFile,
    MD17DataModule,
    MoleculeNPZDataset,
    read_molecule_npz,
)

KCAL_MOL = 0.0433641  # eV
RMD17 = bundled_data_path("rmd17_aspirin_train_01_first250.npz")
SGDML = bundled_data_path("md17_ethanol_first300.npz")


@pytest.mark.parametrize(
    "path, keys",
    [(RMD17, ("nuclear_charges", "coords", "energies", "forces")), (SGDML, ("z", "R", "E", "F"))],
    ids=["rmd17", "sgdml"],
)
def test_read_converts_units(path, keys):
    raw = np.load(path)
    z, R, E, F = (raw[k] for k in keys)
    frames = read_molecule_npz(path, frames=[0, 7])
    for atoms, i in zip(frames, [0, 7]):
        np.testing.assert_array_equal(atoms.numbers, z)
        np.testing.assert_allclose(atoms.positions, R[i])
        assert atoms.get_potential_energy() == pytest.approx(float(E.reshape(-1)[i]) * KCAL_MOL, rel=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), F[i] * KCAL_MOL, rtol=1e-6)
        assert not atoms.pbc.any()


def test_round_trip_through_extxyz(tmp_path):
    """npz -> our dataset, and npz -> ASE -> extxyz -> nequip's ASEDataset, agree exactly."""
    ours = MoleculeNPZDataset(RMD17, max_frames=5)
    atoms = read_molecule_npz(RMD17, frames=range(5))
    xyz = tmp_path / "aspirin.xyz"
    write(xyz, atoms, format="extxyz")
    theirs = ASEDataset(file_path=str(xyz), ase_args={"format": "extxyz"})
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        for key in (
            AtomicDataDict.POSITIONS_KEY,
            AtomicDataDict.ATOMIC_NUMBERS_KEY,
            AtomicDataDict.TOTAL_ENERGY_KEY,
            AtomicDataDict.FORCE_KEY,
        ):
            # extxyz stores 8 decimals
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)


def _write_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def _good_arrays():
    raw = np.load(RMD17)
    return {k: raw[k][:4] if k != "nuclear_charges" else raw[k] for k in ("nuclear_charges", "coords", "energies", "forces")}


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda a: a.pop("forces"), ["missing keys", "forces"]),
        (lambda a: a.update(coords=a["coords"][:, :-1]), ["`coords`", "shape"]),
        (lambda a: a.update(forces=a["forces"][:3]), ["`forces`", "shape"]),
        (lambda a: a.update(energies=a["energies"][:2]), ["`energies`", "one energy per frame"]),
        (lambda a: a["energies"].__setitem__(2, np.nan), ["`energies`", "non-finite", "frame 2"]),
        (lambda a: a["coords"].__setitem__((1, 0, 0), np.inf), ["`coords`", "non-finite", "frame 1"]),
        (lambda a: a.update(nuclear_charges=a["nuclear_charges"].astype(float)), ["`nuclear_charges`", "atomic number"]),
    ],
    ids=["missing-key", "coords-shape", "forces-frames", "energy-count", "nan-energy", "inf-position", "float-z"],
)
def test_bad_file_is_refused(tmp_path, mutate, words):
    arrays = _good_arrays()
    mutate(arrays)
    path = _write_npz(tmp_path, **arrays)
    with pytest.raises(InvalidDataFile) as err:
        MoleculeNPZDataset(path)
    message = str(err.value)
    assert path in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("cut", [0.5, 0.0], ids=["truncated", "not-npz"])
def test_corrupt_file_is_refused(tmp_path, cut):
    """A truncated download or a file that is not an npz at all: InvalidDataFile naming the
    file, not a raw numpy or zipfile error."""
    good = Path(_write_npz(tmp_path, **_good_arrays())).read_bytes()
    path = tmp_path / "corrupt.npz"
    path.write_bytes(good[: int(cut * len(good))] if cut else b"energies, forces, positions\n1, 2, 3\n")
    with pytest.raises(InvalidDataFile, match="corrupt.npz"):
        MoleculeNPZDataset(str(path))


def test_datamodule_protocol():
    """train + val frames drawn from the train file, disjoint; test frames from the test file."""
    dm = MD17DataModule(
        train_file=RMD17,
        test_file=bundled_data_path("rmd17_aspirin_test_01_first200.npz"),
        test_max_frames=20,
        transforms=[],
        seed=3,
        train=30,
        val=10,
    )
    dm.setup("fit")
    dm.setup("test")
    train = [d[AtomicDataDict.POSITIONS_KEY] for d in dm.train_dataset[0]]
    val = [d[AtomicDataDict.POSITIONS_KEY] for d in dm.val_dataset[0]]
    assert len(train) == 30 and len(val) == 10 and len(dm.test_dataset[0]) == 20
    assert not any(torch.equal(t, v) for t in train for v in val)
    # every frame carries a key (of warm-started DEQ training): its index in the file in the
    # low bits, through batching too, and keys of different files never collide
    raw = np.load(RMD17)["coords"]
    for frame in dm.train_dataset[0]:
        index = int(frame["frame_index"]) % 2**32
        np.testing.assert_allclose(frame[AtomicDataDict.POSITIONS_KEY].numpy(), raw[index])
    batch = AtomicDataDict.batched_from_list([dm.train_dataset[0][i] for i in range(3)])
    assert batch["frame_index"].shape == (3,)
    train_keys = {int(f["frame_index"]) for f in MoleculeNPZDataset(RMD17, max_frames=20)}
    test_keys = {int(f["frame_index"]) for f in dm.test_dataset[0]}
    assert len(train_keys) == 20 and not train_keys & test_keys
    with pytest.raises(ValueError, match="train=900"):
        MD17DataModule(train_file=RMD17, transforms=[], seed=0, train=900, val=50)
