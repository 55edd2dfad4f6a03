"""The command-line tools refuse bad arguments before loading anything, naming the argument
and the problem (no traceback, no division by zero, no resolver message for a mistyped path)."""

import pytest

from nequip_deq.scripts.lammps_check import main as lammps_check_main
from nequip_deq.scripts.md import main as md_main


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "0"], ["--steps 0", "at least 1"]),
        (["--write-every", "0"], ["--write-every 0", "at least 1"]),
        (["--print-every", "-1"], ["--print-every -1", "at least 0"]),
        (["--structure", "asprin.xyz"], ["asprin.xyz", "no such file", "rmd17_aspirin"]),
    ],
)
def test_md_refuses_bad_arguments(tmp_path, capsys, args, words):
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"never loaded")
    with pytest.raises(SystemExit) as exit_:
        md_main([str(model), *args, "--out", str(tmp_path / "md")])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message, message
    assert not (tmp_path / "md").exists()


def test_md_refuses_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        md_main([str(tmp_path / "missing.ckpt")])
    assert "missing.ckpt: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not a zip archive"], ids=["missing", "corrupt"])
def test_lammps_check_says_what_is_wrong_with_the_file(tmp_path, capsys, content):
    path = tmp_path / "model.nequip.pt2"
    if content is not None:
        path.write_bytes(content)
    assert lammps_check_main([str(path), "C", "H"]) == 2
    message = capsys.readouterr().err
    assert "model.nequip.pt2" in message
    assert ("no such file" if content is None else "not a loadable AOTInductor package") in message, message
