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
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00 binary")  # was a UnicodeDecodeError naming no file
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and not out and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'config.json'} is not valid JSON ('utf-8' codec can't decode byte 0xff" in err, err
    (tmp_path / "config.json").write_text("[1]")  # was "not a ppap_fast.experts checkpoint (format=None)"
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and not out and len(err.splitlines()) == 1, err
    assert (f"{tmp_path / 'config.json'} must hold a JSON object, got a JSON list: pass a folder written by "
            "save_experts, or save the experts again") in err, err


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


def _small_set(out, num_images=6, shard_size=4, size=8):
    """A data-free set as `generate` writes it (images and teacher logits), without sampling."""
    import numpy as np

    from ppap_fast.data import ShardWriter

    rng = np.random.default_rng(0)
    w = ShardWriter(out, num_images, shard_size, meta={"kind": "datafree", "seed": 5, "respacing": "ddim3",
                                                       "unet_state": "ab" * 32})
    w.run(lambda k: {"images": rng.integers(0, 256, (w.shard_count(k), size, size, 3), dtype=np.uint8),
                     "logits": rng.standard_normal((w.shard_count(k), 7)).astype(np.float32)})
    return out


def test_info_summarises_a_data_free_set(capsys, tmp_path):
    data = _small_set(tmp_path / "set")
    rc, out, err = run(capsys, str(data), str(WEIGHTS_DIR / "ppap5"), "--device", "cpu", "--verify-data",
                               "--no-progress")  # no bar: stderr must stay empty
    assert rc == 0 and not err
    res = json.loads(out)
    assert [c["n_experts"] for c in res["experts"]] == [5]  # checkpoints and sets side by side
    s = res["data_sets"][0]
    assert (s["path"], s["complete"], s["num_images"], s["num_shards"], s["shards_readable"]) == (str(data), True, 6, 2, 2)
    assert s["arrays"] == {"images": {"row_shape": [8, 8, 3], "dtype": "uint8"},
                           "logits": {"row_shape": [7], "dtype": "float32"}}
    assert s["settings"] == {"kind": "datafree", "seed": 5, "respacing": "ddim3", "unet_state": "ab" * 8}
    assert s["verified"] is True and s["problems"] == [] and s["preview"] is None


def test_info_verify_data_without_a_data_free_set_is_refused(capsys):
    """--verify-data with no data-free set among the paths verified nothing, without a word."""
    for paths in ([], [str(WEIGHTS_DIR / "ppap5")]):
        rc, out, err = run(capsys, *paths, "--verify-data")
        assert rc == 2 and not out and "--verify-data checks data-free sets" in err, err


def test_info_names_a_data_free_sets_damaged_and_missing_shards(capsys, tmp_path):
    data = _small_set(tmp_path / "set", size=64)
    shard = data / "shard_00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[9000] ^= 0xFF  # inside the images' bytes, past what the headers' read sees: only a whole read (CRC-32) does
    shard.write_bytes(bytes(raw))
    rc, out, err = run(capsys, str(data))
    assert rc == 0 and json.loads(out)["data_sets"][0]["verified"] is None  # headers only: not read
    rc, out, err = run(capsys, str(data), "--verify-data")
    s = json.loads(out)["data_sets"][0]
    assert rc == 2 and s["verified"] is False and "shard_00001.npz: member images.npy fails its CRC-32 check" in err
    shard.write_bytes(bytes(raw[:300]))  # truncated: no zip directory
    rc, out, err = run(capsys, str(data))
    assert rc == 2 and f"{data}/shard_00001.npz: DAMAGED" in err
    shard.unlink()
    rc, out, err = run(capsys, str(data))
    s = json.loads(out)["data_sets"][0]
    assert rc == 2 and f"{data}/shard_00001.npz: missing" in err and s["shards_readable"] == 1


def test_info_on_an_unfinished_or_foreign_data_set(capsys, tmp_path):
    data = _small_set(tmp_path / "set")
    man = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**man, "complete": False}))
    (data / "shard_00001.npz").unlink()  # generation stopped: a rerun writes it, nothing is wrong
    rc, out, err = run(capsys, str(data))
    s = json.loads(out)["data_sets"][0]
    assert rc == 0 and not err and not s["complete"] and s["problems"] == []
    assert s["note"].startswith("incomplete (1 of 2 shards missing or unfinished): rerun the same generate command")
    for bad in ('{"shards": "x"}', '[1, 2]'):
        (data / "manifest.json").write_text(bad)
        rc, out, err = run(capsys, str(data))
        assert rc == 2 and not out and "is not a ppap_fast data-free set manifest" in err


def test_info_reads_a_distributed_sets_nested_config(capsys, tmp_path):
    from ppap_fast import distributed as D

    data = tmp_path / "set"
    D.generate(D.GenerateConfig(str(data), num_images=3, shard_size=2, image_size=8, channels=1, denoiser="random-conv",
                                respacing="ddim2", seed=7, device="cpu"), D.DistEnv())
    rc, out, err = run(capsys, str(data))
    s = json.loads(out)["data_sets"][0]
    assert rc == 0 and s["format"] == D.FORMAT and s["complete"] and s["shards_readable"] == 2
    assert s["settings"]["seed"] == 7 and s["settings"]["respacing"] == "ddim2" and s["settings"]["denoiser"] == "random-conv"


def test_info_reports_a_distill_run_in_progress(capsys, tmp_path, monkeypatch):
    """A killed (or running) distill: info on its --out reads the state beside it: step of steps, the settings,
    the loss over the first and last steps, per expert too."""
    from ppap_fast.distributed import SimulatedCrash

    data, out = tmp_path / "data", tmp_path / "out"
    common = ["--weights-dir", str(WEIGHTS_DIR), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "4", "--shard-size", "4", "--steps", "2"] + common) == 0
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(SimulatedCrash):  # the state is written at step 2, then killed at 3
        main(["distill", "--data", str(data), "--experts", "2", "--rank", "2", "--steps", "5", "--batch-size", "4",
              "--checkpoint-every", "2", "--out", str(out)] + common)
    capsys.readouterr()
    state = tmp_path / "out.distill_state.safetensors"
    assert not out.exists() and state.is_file()
    for arg in (out, state):
        rc, text, err = run(capsys, str(arg))
        assert rc == 0 and not err
        s = json.loads(text)["training_states"][0]
        assert (s["path"], s["step"], s["steps"], s["done"], s["world_size"]) == (str(state), 2, 5, 0.4, 1)
        assert s["config"]["n_experts"] == 2 and s["elapsed_s"] >= 0 and s["loss_over_steps"] == 2
        assert s["loss_first"] == s["loss_last"] and s["loss_first"] > 0  # 2 steps: both means over both
        assert len(s["expert_loss_last"]) == 2 and all(v is None or v > 0 for v in s["expert_loss_last"])
    (tmp_path / "notes.txt").write_text("x")
    rc, text, err = run(capsys, str(tmp_path / "notes.txt"))
    assert rc == 2 and "is a file but no training state" in err


@pytest.mark.parametrize("n,over", [(6, 6), (120, 50)])
def test_training_state_loss_window_is_the_real_count(tmp_path, n, over):
    """loss_over_steps said 50 for a state of 6 recorded steps (the means were over 6)."""
    from safetensors.torch import save_file

    from ppap_fast.distributed import TRAIN_STATE_FORMAT
    from ppap_fast.info import training_state_summary

    path = tmp_path / "train_state.safetensors"
    save_file({"losses": torch.arange(1.0, n + 1)}, str(path),
              metadata={"format": TRAIN_STATE_FORMAT, "step": str(n), "config": json.dumps({"steps": 200})})
    s = training_state_summary(path)
    assert s["loss_over_steps"] == over and s["loss_last"] == sum(range(n - over + 1, n + 1)) / over



@pytest.mark.parametrize("content", [b"", b"\x00\x01 not safetensors" * 8, "truncated"],
                         ids=["empty", "garbage", "truncated"])
def test_info_on_an_unreadable_training_state_is_one_line(capsys, tmp_path, content):
    """A truncated or foreign *.safetensors (a run's state file cut by a full disk) ended in SafetensorError's
    traceback: it is no ValueError."""
    from safetensors.torch import save_file

    path = tmp_path / "o.distill_state.safetensors"
    if content == "truncated":
        save_file({"losses": torch.ones(8)}, str(path), metadata={"format": "x"})
        content = path.read_bytes()[:-5]
    path.write_bytes(content)
    rc, out, err = run(capsys, str(path))
    assert rc == 2 and not out and len(err.splitlines()) == 1, err
    assert f"{path} is not a readable safetensors file (SafetensorError: " in err and "truncated" in err, err


@pytest.mark.parametrize("meta, why", [({"config": "{bad"}, "Expecting property name"),
                                       ({"config": "[1]"}, "its config is a JSON list, not an object"),
                                       ({"step": "abc"}, "invalid literal for int()"),
                                       ({"elapsed_s": "x"}, "could not convert string to float")])
def test_info_on_a_training_state_with_damaged_metadata_names_the_file(capsys, tmp_path, meta, why):
    """A config that was no JSON object ended in AttributeError's traceback, a bad JSON / step in an error
    naming no file."""
    from safetensors.torch import save_file

    from ppap_fast.distributed import TRAIN_STATE_FORMAT

    path = tmp_path / "train_state.safetensors"
    save_file({"losses": torch.ones(3)}, str(path), metadata={"format": TRAIN_STATE_FORMAT, **meta})
    rc, out, err = run(capsys, str(tmp_path))
    assert rc == 2 and not out and len(err.splitlines()) == 1, err
    assert f"{path} is a training state with damaged metadata (" in err and why in err, err

def test_info_reports_a_rerun_in_progress_over_a_previous_output(capsys, tmp_path, monkeypatch):
    """A finetune / distill rerun into an existing --out keeps its state beside that output: info on the --out
    reported only the old experts (distill) or failed with 'not a ppap_fast training state' (finetune's file)."""
    from ppap_fast.distributed import SimulatedCrash

    common = ["--weights-dir", str(WEIGHTS_DIR), "--no-progress"]
    data, d_out, f_out = tmp_path / "data", tmp_path / "ppap", tmp_path / "multi.safetensors"
    assert main(["generate", "--out", str(data), "--num-images", "4", "--shard-size", "4", "--steps", "2"] + common) == 0
    distill = ["distill", "--data", str(data), "--experts", "2", "--rank", "2", "--batch-size", "4",
               "--checkpoint-every", "2", "--out", str(d_out)] + common
    finetune = ["finetune", "--experts", "2", "--batch-size", "4", "--checkpoint-every", "2", "--out", str(f_out)] + common
    for args in (distill, finetune):
        assert main(args + ["--steps", "1"]) == 0  # the previous output
        monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
        monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
        with pytest.raises(SimulatedCrash):  # the rerun: state at step 2, killed at 3
            main(args + ["--steps", "5"])
        monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    capsys.readouterr()
    for out, suffix in ((d_out, ".distill_state.safetensors"), (f_out, ".finetune_state.safetensors")):
        rc, text, err = run(capsys, str(out))
        assert rc == 0 and not err, err
        s = json.loads(text)["training_states"]
        assert [(x["path"], x["step"], x["steps"]) for x in s] == [(str(out) + suffix, 2, 5)]
    assert json.loads(run(capsys, str(d_out))[1])["experts"][0]["n_experts"] == 2  # the previous output too


def test_info_on_the_current_folder(capsys, tmp_path, monkeypatch):
    """`info .`: ValueError "PosixPath('.') has an empty name" (looking for a state beside it)."""
    d = tmp_path / "ppap5"
    shutil.copytree(WEIGHTS_DIR / "ppap5", d)
    monkeypatch.chdir(d)
    rc, out, err = run(capsys, ".")
    assert rc == 0 and not err and json.loads(out)["experts"][0]["n_experts"] == 5
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, ".")
    assert rc == 2 and "holds no expert checkpoint" in err


def test_file_status_hashes_each_file_once(tmp_path, monkeypatch):
    """With a .prev copy beside it, the file was read and hashed twice (experts files are large)."""
    from ppap_fast.experts import checkpoint
    from ppap_fast.info import _file_status

    f, prev = tmp_path / "experts.safetensors", tmp_path / ".experts.safetensors.prev"
    f.write_bytes(b"new")
    prev.write_bytes(b"old")
    seen = []
    real = checkpoint._digest
    monkeypatch.setattr(checkpoint, "_digest", lambda b: seen.append(b) or real(b))
    assert _file_status(f, real(b"new")) == "ok (sha256 verified)" and seen == [b"new"]
    seen.clear()
    assert _file_status(f, real(b"old")).startswith("ok") and seen == [b"new", b"old"]  # the copy loads
    seen.clear()
    assert _file_status(f, real(b"other")).startswith("DAMAGED") and seen == [b"new", b"old"]


def test_info_on_a_save_interrupted_before_its_config_is_not_damaged(capsys, tmp_path):
    """A save killed before its config.json leaves the new experts file beside the previous one (kept as
    .experts.safetensors.prev): loading falls back to that copy, but info called the checkpoint DAMAGED (exit 2)."""
    import warnings

    from ppap_fast.data import shards
    from ppap_fast.demo import load_classifier
    from ppap_fast.experts import load_experts, save_experts

    d = tmp_path / "ppap5"
    shutil.copytree(WEIGHTS_DIR / "ppap5", d)
    bank = load_ppap_bank(5)
    with torch.no_grad():
        next(p for p in bank.parameters() if p.requires_grad).add_(1)

    def killed(*a, **k):
        raise KeyboardInterrupt

    real, shards.write_json_atomic = shards.write_json_atomic, killed
    try:
        with pytest.raises(KeyboardInterrupt):
            save_experts(bank, d)
    finally:
        shards.write_json_atomic = real
    assert (d / ".experts.safetensors.prev").is_file()
    with pytest.warns(UserWarning, match="interrupted before its config.json"):
        load_experts(d, load_classifier())  # the previous checkpoint loads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc, out, err = run(capsys, str(d))
    c = json.loads(out)["experts"][0]
    assert rc == 0 and not err and c["verified"], err
    assert "previous copy .experts.safetensors.prev" in c["files"]["experts.safetensors"]
    assert c["values"] == json.loads(run(capsys, str(WEIGHTS_DIR / "ppap5"))[1])["experts"][0]["values"]
    (d / ".experts.safetensors.prev").write_bytes(b"x")  # and no copy to fall back to: damaged, as before
    rc, out, err = run(capsys, str(d))
    assert rc == 2 and "experts.safetensors: DAMAGED" in err


def test_info_on_a_finished_finetune_output_file_summarises_it(capsys, tmp_path):
    """`info multi5.safetensors` (finetune's --out, a file): "not a ppap_fast training state (format None)"."""
    out = tmp_path / "multi[2].safetensors"
    assert main(["finetune", "--experts", "2", "--batch-size", "4", "--steps", "1", "--out", str(out),
                 "--weights-dir", str(WEIGHTS_DIR), "--no-progress"]) == 0
    capsys.readouterr()
    rc, text, err = run(capsys, str(out))
    assert rc == 0 and not err, err
    s = json.loads(text)
    assert "training_states" not in s
    m = s["models"]
    assert [(x["path"], x["kind"], x["n_experts"]) for x in m] == [(str(out), "multiexperts", 2)]
    assert "multi-experts" in m[0]["what"] and m[0]["base_kind"]


@pytest.mark.parametrize("output", ["experts", "model_file"])
def test_info_reports_an_output_beside_a_damaged_training_state_and_flags_the_state(capsys, tmp_path, output):
    """A rerun's state file cut short next to a good checkpoint (or a finetune output file) made the whole report
    fail: rc 2, no JSON. The output is summarised; the state is flagged (and exit 2, as for a damaged file)."""
    from ppap_fast.models.tiny import TinyResNet, save_model

    if output == "experts":
        out = tmp_path / "ppap5"
        shutil.copytree(WEIGHTS_DIR / "ppap5", out)
        state = out / "train_state.safetensors"
    else:
        out = save_model(TinyResNet(widths=(4,), layers=(1,)), tmp_path / "model.safetensors")
        state = tmp_path / "model.safetensors.finetune_state.safetensors"
    state.write_bytes(b"\x00\x01 not safetensors" * 8)
    rc, text, err = run(capsys, str(out))
    res = json.loads(text)
    if output == "experts":
        assert res["experts"][0]["verified"] and res["experts"][0]["n_experts"] == 5
    else:
        assert [m["kind"] for m in res["models"]] == ["resnet"] and "problem" not in res["models"][0]
    [s] = res["training_states"]
    assert s["path"] == str(state) and s["problem"].startswith(f"{state} is not a readable safetensors file (")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"damaged or missing checkpoint files, shards or training states: {s['problem']}" in err, err


def test_info_on_a_model_file_with_unreadable_metadata_exits_2(capsys, tmp_path):
    """Its JSON said "problem: unreadable metadata" but info exited 0 with nothing on stderr (load_model fails)."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"kind": "resnet", "config": "{bad"})
    rc, text, err = run(capsys, str(path))
    [m] = json.loads(text)["models"]
    assert m["problem"].startswith("unreadable metadata: JSONDecodeError: Expecting property name")
    assert rc == 2 and len(err.splitlines()) == 1 and f"training states: {path}: {m['problem']}" in err, err
