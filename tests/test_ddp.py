"""Multi-process training: nequip-train with Lightning's DDP strategy, 2 CPU processes (gloo),
on the DEQ model with the implicit training gradient and warm-started training (each rank
keeps the fixed points of the frames it saw). Each rank trains on its half of the data (half
the optimizer steps per epoch), the run finishes, and the validation loss goes down."""

import csv
import pathlib
import subprocess

import pytest

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
DEQ_MODEL = [
    "training_module.model._target_=nequip_deq.model.DEQEquiformerModel",
    "+training_module.model.l_max=1",
    "+training_module.model.irreps_node_features=8x0e+4x1o",
    "+training_module.model.num_heads=2",
    "+training_module.model.num_basis=8",
    "+training_module.model.radial_mlp_width=16",
    "+training_module.model.num_output_features=16",
    "+training_module.model.avg_num_neighbors=${training_data_stats:num_neighbors_mean}",
    "+training_module.model.per_type_energy_shifts=${training_data_stats:per_atom_energy_mean}",
    "+training_module.model.per_type_energy_scales=${training_data_stats:forces_rms}",
    "training_module._target_=nequip_deq.train.DEQLightningModule",
    "+training_module.warm_start_training=true",
]


@pytest.mark.slow
def test_two_process_ddp_training_of_a_deq_model(tmp_path):
    result = subprocess.run(
        [
            "nequip-train", "-cp", str(CONFIG_DIR), "-cn", "minimal_aspirin",
            f"hydra.run.dir={tmp_path}", *DEQ_MODEL, "data.train=20", "trainer.max_epochs=2",
            "+trainer.strategy=ddp", "+trainer.devices=2", "+trainer.accelerator=cpu",
            "+trainer.logger={_target_: lightning.pytorch.loggers.CSVLogger, save_dir: " + str(tmp_path) + "}",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log, log[-3000:]
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # the second rank ran
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    # 20 frames, batch 5, 2 ranks: 2 optimizer steps per epoch (1 process would take 4)
    steps = [int(r["step"]) for r in rows if r.get("train_loss_epoch/weighted_sum")]
    assert steps == [1, 3], steps
    losses = [float(r["val0_epoch/weighted_sum"]) for r in rows if r.get("val0_epoch/weighted_sum")]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert (tmp_path / "best.ckpt").is_file()
