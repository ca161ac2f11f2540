"""The public checks in ppap_fast.testing, as a user with the official goldens would call them."""
import json
import re

import pytest

from ppap_fast import testing


def test_ppap_checkpoint_manifest(fixtures_dir, tmp_path):
    report = testing.check_ppap_checkpoint_manifest(fixtures_dir / "ppap_resnet50_lora_keys.json")
    assert report["trainable_per_expert"] == 1_459_632 and report["lora_layers"] == 33
    manifest = json.loads((fixtures_dir / "ppap_resnet50_lora_keys.json").read_text())
    key = next(k for k in manifest["state_dict"] if "lora_A" in k)
    manifest["state_dict"][key] = [1, 1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"1 misshaped\).*shape mismatches \['{re.escape(key)}: "
                                         r"expected \(112, 21\), got \(1, 1\)'\]"):
        testing.check_ppap_checkpoint_manifest(bad)


def test_adm_checks(fixtures_dir):
    assert testing.check_adm_golden(fixtures_dir / "adm_small_golden_1.pt") < 1e-4
    assert testing.check_adm_manifest(fixtures_dir / "adm256_uncond_keys.json") == 552_814_086


def test_max_abs_err_compares_complex_and_numpy_inputs():
    import numpy as np
    import torch

    # complex tensors went through .double(), which drops the imaginary part: 1+1j vs 1+2j gave 0.0
    assert testing.max_abs_err(torch.tensor([1 + 1j]), torch.tensor([1 + 2j])) == pytest.approx(1.0)
    assert testing.max_abs_err(torch.tensor([1 + 1j]), torch.tensor([complex(1, float("nan"))])) == float("inf")
    assert testing.max_abs_err(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.5)  # 'no .detach'
    assert testing.max_abs_err(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == float("inf")


def test_state_dict_sha256_of_bfloat16_weights():
    import torch

    # numpy has no bfloat16: 'Got unsupported ScalarType BFloat16'
    w = torch.randn(3, 2)
    bf = {"w": w.bfloat16()}
    assert testing.state_dict_sha256(bf) == testing.state_dict_sha256({"w": w.bfloat16().view(torch.int16)})
    assert testing.state_dict_sha256(bf) != testing.state_dict_sha256({"w": (w * 2).bfloat16()})
    assert testing.state_dict_sha256({"s": torch.tensor(1.0, dtype=torch.bfloat16)})  # 0-d too


def test_linear_classifier_guide_needs_one_label_per_sample():
    import re

    import torch

    # y of length 1 with a batch of 4 guided every sample to y[0]; length 3 gave an indexing error
    W, x = torch.randn(3, 8), torch.randn(4, 2, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    grad = testing.linear_classifier_guide(W, y, 2.0)(x, torch.zeros(4))
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    for bad in (y[:1], y[:3], torch.tensor(1), torch.cat([y, y])):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"one label per sample, \[4\], got shape {shape}"):
            testing.linear_classifier_guide(W, bad, 2.0)(x, torch.zeros(4))


def test_readme_names_the_public_checks():
    """README's fidelity section says what ppap_fast.testing checks: the check_* it names are the public ones
    (it credited the module with a loralib conv check that only the tests run)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Fidelity to the official code", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(check_\w+)`", section)) == {n for n in testing.__all__ if n.startswith("check_")}


def test_manifest_checks_refuse_malformed_manifests_in_one_line_naming_the_file(fixtures_dir, tmp_path):
    """json.loads named no file for a damaged manifest; a missing or mistyped entry was a bare KeyError /
    TypeError ('params', 'lora', ...)."""
    adm = json.loads((fixtures_dir / "adm256_uncond_keys.json").read_text(encoding="utf-8"))
    ppap = json.loads((fixtures_dir / "ppap_resnet50_lora_keys.json").read_text(encoding="utf-8"))
    shape_key = next(iter(ppap["state_dict"]))
    no_config = {k: v for k, v in adm.items() if k not in ("unet_kwargs", "config")}
    cases = [
        (testing.check_adm_manifest, "{", r"ADM manifest .*m0\.json is not valid JSON \(Expecting property name"),
        (testing.check_adm_manifest, "[]", r"ADM manifest .*m1\.json must hold a JSON object, got a JSON list"),
        (testing.check_adm_manifest, {k: v for k, v in adm.items() if k != "params"},
         r"ADM manifest .*m2\.json has no 'params' entry"),
        (testing.check_adm_manifest, {**adm, "params": {"out.2.bias": 3}},
         r"ADM manifest .*m3\.json: entry 'params' must map names to shape lists of ints; 1 do not "
         r"\(e\.g\. 'out\.2\.bias': 3\)"),
        (testing.check_adm_manifest, no_config, r"ADM manifest .*m4\.json has no 'config' entry"),
        (testing.check_adm_manifest, {**no_config, "config": "adm_huge"},
         r"ADM manifest .*m5\.json: its config does not build an ADMUNet \(ValueError: unknown ADM preset"),
        (testing.check_ppap_checkpoint_manifest, "\xff", r"PPAP manifest .*m6\.json is not valid JSON \('utf-8' codec"),
        (testing.check_ppap_checkpoint_manifest, {k: v for k, v in ppap.items() if k != "lora"},
         r"PPAP manifest .*m7\.json has no 'lora\.r' entry"),
        (testing.check_ppap_checkpoint_manifest, {**ppap, "lora": {**ppap["lora"], "r": "16"}},
         r"PPAP manifest .*m8\.json: entry 'lora\.r' must be an integer, got '16'"),
        (testing.check_ppap_checkpoint_manifest, {k: v for k, v in ppap.items() if k != "trainable"},
         r"PPAP manifest .*m9\.json has no 'trainable' entry"),
        (testing.check_ppap_checkpoint_manifest, {**ppap, "state_dict": {shape_key: "64"}},
         r"PPAP manifest .*m10\.json: entry 'state_dict' must map names to shape lists of ints"),
    ]
    for i, (check, content, msg) in enumerate(cases):
        path = tmp_path / f"m{i}.json"
        if isinstance(content, str):
            path.write_bytes(content.encode("latin-1"))
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        with pytest.raises(ValueError, match=msg) as err:
            check(path)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"ADM manifest not found: .*nowhere\.json"):
        testing.check_adm_manifest(tmp_path / "nowhere.json")
