"""The public checks in ppap_fast.testing, as a user with the official goldens would call them."""
import json

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
    with pytest.raises(ValueError):
        testing.check_ppap_checkpoint_manifest(bad)


def test_adm_checks(fixtures_dir):
    assert testing.check_adm_golden(fixtures_dir / "adm_small_golden_1.pt") < 1e-4
    assert testing.check_adm_manifest(fixtures_dir / "adm256_uncond_keys.json") == 552_814_086
