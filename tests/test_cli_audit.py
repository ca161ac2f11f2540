"""Bad input to the CLI and the examples found by a user's audit: one line, exit status 2, nothing written."""
import shutil

import pytest

from ppap_fast.cli import main
from ppap_fast.demo import make_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("w"))


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppap-fast: error: "), err
    return err[0]


@pytest.mark.parametrize("task, file, other", [("semantic", "semseg.safetensors", "segnet.safetensors"),
                                               ("segmentation", "segnet.safetensors", "semseg.safetensors")])
def test_generate_refuses_the_other_segmentation_net(tmp_path, capsys, weights, task, file, other):
    """Both nets are segnets: a 2-class stroke net as semseg.safetensors (or the 11-class semantic one as
    segnet.safetensors) cached the wrong net's outputs for --task, silently."""
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    shutil.copy(weights / other, w / file)
    out = tmp_path / "set"
    assert main(["generate", "--weights-dir", str(w), "--task", task, "--out", str(out), "--num-images", "2",
                 "--steps", "2", "--no-progress"]) == 2
    err = _err(capsys)
    want = {"semantic": "11-class", "segmentation": "2-class"}[task]
    assert str(w / file) in err and f"--task {task} needs the {want} one" in err, err
    assert not out.exists()  # refused before the folder was made
