"""`ppap-fast info`: the install's versions / devices / op backends and expert checkpoints verified."""
import json
import shutil

import pytest
import torch

from ppap_fast.cli import main
from ppap_fast.demo import WEIGHTS_DIR, load_ppap_bank


def run(capsys, *args):
    rc = main(["info", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_reports_the_environment_and_verifies_the_shipped_experts(capsys):
    rc, out, err = run(capsys, str(WEIGHTS_DIR / "ppap5"), str(WEIGHTS_DIR / "ppap10"), "--device", "cpu")
    assert rc == 0 and not err
    res = json.loads(out)
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["backend_device"] == "cpu"
    assert "reference" in env["ops_runnable"]["guided_update"] and "lora_conv2d" in env["ops_runnable"]
    assert all("reference" not in reasons for reasons in env["backends_not_runnable"])
    for c, n in zip(res["experts"], (5, 10)):
        assert c["n_experts"] == n and c["verified"] and c["files"] == {"experts.safetensors": "ok (sha256 verified)"}
        assert len(c["bands"]) == n and c["layout"] == "loralib"
        # the trainable count read from tensor shapes alone equals the bank's own report
        assert c["values"]["trainable_per_expert"] * n == load_ppap_bank(n).parameter_report()["total_trainable"]
        assert c["values"]["buffers_per_expert"] > 0 and c["values"]["not_per_expert"] == 0


def test_info_names_damaged_missing_and_undigested_files(capsys, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(WEIGHTS_DIR / "ppap5", bad)
    data = bytearray((bad / "experts.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "experts.safetensors").write_bytes(bytes(data))
    rc, out, err = run(capsys, str(bad))
    assert rc == 2 and "damaged or missing checkpoint files" in err and "experts.safetensors: DAMAGED" in err
    c = json.loads(out)["experts"][0]
    assert not c["verified"] and c["files"]["experts.safetensors"].startswith("DAMAGED") and c["values"] is None

    (bad / "experts.safetensors").unlink()
    rc, out, err = run(capsys, str(bad))
    assert rc == 2 and "experts.safetensors: missing" in err

    old = tmp_path / "old"  # saved before digests were recorded: summarised, not verified, no error
    shutil.copytree(WEIGHTS_DIR / "ppap5", old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["files"]
    (old / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run(capsys, str(old))
    c = json.loads(out)["experts"][0]
    assert rc == 0 and not err and not c["verified"]
    assert c["files"] == {"experts.safetensors": "present (no digest recorded)"} and c["values"]["trainable_per_expert"]
    data = (old / "experts.safetensors").read_bytes()  # no digest to catch a truncated file: the reader does
    (old / "experts.safetensors").write_bytes(data[:1000])
    rc, out, err = run(capsys, str(old))
    c = json.loads(out)["experts"][0]
    assert rc == 2 and "experts.safetensors: DAMAGED (not a readable safetensors file" in err and c["values"] is None


def test_info_on_a_folder_that_is_no_checkpoint_is_one_error_line(capsys, tmp_path):
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and not out and err.startswith("ppap-fast: error:") and "config.json" in err
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and "is not a ppap_fast.experts checkpoint" in err


@pytest.mark.parametrize("edit, key", [
    (lambda c: c.pop("n_experts"), "n_experts"),
    (lambda c: c.update(n_experts=0), "n_experts"),
    (lambda c: c["files"]["experts.safetensors"].pop("bytes"), "files.experts.safetensors"),
    (lambda c: c["files"].update({"experts.safetensors": "x"}), "files.experts.safetensors"),
    (lambda c: c["placement"].update(lora=3), "placement.lora"),
])
def test_info_on_a_hand_edited_config_names_the_damaged_key(capsys, tmp_path, edit, key):
    """A config.json lacking a key info reads (a digest's bytes, ...) gave a KeyError / TypeError traceback."""
    d = tmp_path / "edited"
    shutil.copytree(WEIGHTS_DIR / "ppap5", d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run(capsys, str(d))
    assert rc == 2 and not out and err.startswith("ppap-fast: error:") and len(err.strip().splitlines()) == 1
    assert "config.json is damaged" in err and repr(key) in err, err
