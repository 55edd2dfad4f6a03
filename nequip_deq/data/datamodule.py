"""The standard MD17-family protocol as a nequip data module (local files, no download)."""

from typing import Callable, List, Optional

from nequip.data.datamodule import NequIPDataModule

from .molecule_npz import num_frames


class MD17DataModule(NequIPDataModule):
    """Train on ``train + val`` frames drawn at random from one file, test on another.

    The published rMD17 protocol is ``train_file=rmd17_<mol>_train_NN.npz`` (1000 frames),
    ``train=950``, ``val=50``, ``test_file=rmd17_<mol>_test_NN.npz``. Files may be rMD17 or
    sGDML (MD17, MD22) npz; see :class:`~nequip_deq.data.MoleculeNPZDataset`.

    Args:
        train_file (str): npz file that train and validation frames are drawn from
        test_file (str): npz file of the test frames (optional)
        transforms (List[Callable]): nequip data transforms
        seed (int): seed of the random train/validation split
        train (int): number of training frames (default 950)
        val (int): number of validation frames (default 50)
        test_max_frames (int): use only the first frames of ``test_file`` (default: all)
        energy_unit (str): unit of the files' energies (default ``kcal/mol``)
        **kwargs: dataloaders and ``stats_manager``, as for
            :class:`~nequip.data.datamodule.NequIPDataModule`
    """

    def __init__(
        self,
        train_file: str,
        transforms: List[Callable],
        seed: int,
        train: int = 950,
        val: int = 50,
        test_file: Optional[str] = None,
        test_max_frames: Optional[int] = None,
        energy_unit: str = "kcal/mol",
        **kwargs,
    ):
        available = num_frames(train_file)
        if train < 1 or val < 1 or train + val > available:
            raise ValueError(
                f"`train={train}` + `val={val}` frames requested but `{train_file}` has "
                f"{available}; choose train >= 1, val >= 1 with train + val <= {available}."
            )
        dataset = {
            "_target_": "nequip_deq.data.MoleculeNPZDataset",
            "file_path": train_file,
            "transforms": list(transforms),
            "energy_unit": energy_unit,
        }
        if train + val < available:
            dataset = {
                "_target_": "nequip.data.dataset.SubsetByRandomSlice",
                "dataset": dataset,
                "start": 0,
                "length": train + val,
                "seed": seed,
            }
        test_dataset = []
        if test_file is not None:
            test_dataset = [
                {
                    "_target_": "nequip_deq.data.MoleculeNPZDataset",
                    "file_path": test_file,
                    "transforms": list(transforms),
                    "energy_unit": energy_unit,
                    "max_frames": test_max_frames,
                }
            ]
        super().__init__(
            seed=seed,
            split_dataset=[{"dataset": dataset, "train": train, "val": val}],
            test_dataset=test_dataset,
            **kwargs,
        )
