"""The trained weights shipped in ppap_fast/weights: present, within budget, loadable."""
import pytest
import torch

from ppap_fast.demo import DEMO_METHODS, WEIGHTS_DIR, load_evaluator, load_guide_model, load_unet

FILES = ["unet.safetensors", "classifier.safetensors", "evaluator.safetensors", "noise_aware.safetensors",
         "multi5.safetensors", "ppap5/experts.safetensors", "ppap5/config.json", "ppap10/experts.safetensors",
         "ppap10/config.json", "segnet.safetensors", "seg_ppap5/experts.safetensors", "seg_ppap5/config.json",
         "semseg.safetensors", "semseg_ppap5/experts.safetensors", "semseg_ppap5/config.json"]


def test_shipped_weights_exist_and_fit_the_budget():
    missing = [f for f in FILES if not (WEIGHTS_DIR / f).is_file()]
    assert not missing, f"missing shipped weights: {missing}"
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024, total


def test_shipped_weights_load_for_every_demo_method():
    unet = load_unet(WEIGHTS_DIR)
    ev = load_evaluator(WEIGHTS_DIR)
    x = torch.zeros(2, 1, 16, 16)
    assert unet(x, torch.tensor([10, 900])).shape == x.shape
    assert ev(x).shape == (2, 10)
    for m in DEMO_METHODS:
        model, pass_t, info = load_guide_model(WEIGHTS_DIR, m)
        if model is not None:
            out = model(x, torch.tensor([0, 999])) if pass_t else model(x)
            assert out.shape == (2, 10), m
        assert info["labelled_data"] == (500 if m in ("noise-aware", "multi-experts-5") else 0), m


@pytest.mark.slow
def test_shipped_ppap10_guides_towards_the_target():
    """A small real run: PPAP-10 at DDIM-25 hits the requested class more often than no guidance."""
    from ppap_fast.demo import evaluate_samples, sample_method
    from ppap_fast.data import to_uint8

    ev = load_evaluator(WEIGHTS_DIR)
    targets = torch.arange(30) % 10
    accs = {}
    for m in ("none", "ppap-10"):
        x, _ = sample_method(m, WEIGHTS_DIR, targets, progress=False)
        accs[m] = evaluate_samples(to_uint8(x), targets.numpy(), ev)["target_accuracy"]
    assert accs["ppap-10"] > accs["none"] + 0.3, accs


def test_public_loaders_of_the_shipped_classifier_and_ppap_banks():
    """load_classifier / load_ppap_bank: what the examples start from (no private _load_ppap, no paths)."""
    from ppap_fast import ExpertBank
    from ppap_fast.demo import DemoError, load_classifier, load_ppap_bank

    clf = load_classifier()
    assert type(clf).__name__ == "TinyResNet" and not clf.training
    x, t = torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])
    for n in (5, 10):
        bank = load_ppap_bank(n)
        assert isinstance(bank, ExpertBank) and bank.n_experts == n and not bank.training
        model, _, _ = load_guide_model(WEIGHTS_DIR, f"ppap-{n}")  # the demo's merged router: same outputs
        torch.testing.assert_close(bank(x, t), model(x, t), rtol=1e-4, atol=1e-4)
    bank = load_ppap_bank(5, classifier=clf)  # the bank works on its own copy: clf stays the naive guide
    assert isinstance(clf.conv1, torch.nn.Conv2d) and type(bank.model.conv1) is not torch.nn.Conv2d
    assert load_unet().kind == "unet" and load_evaluator().kind == "evalnet"  # default: the shipped weights
    with pytest.raises(DemoError, match="not found.*ppap4"):
        load_ppap_bank(4)


@pytest.mark.parametrize("folder,teacher", [("ppap5", "classifier"), ("ppap10", "classifier"),
                                            ("seg_ppap5", "segnet"), ("semseg_ppap5", "semseg")])
def test_shipped_experts_record_their_files_and_base(folder, teacher, tmp_path):
    """Every shipped expert checkpoint names its files' digests and its frozen base: a damaged file or
    experts loaded onto another teacher are caught, not silently used."""
    import json
    import shutil
    import warnings

    from ppap_fast.demo import load_teacher
    from ppap_fast.experts import load_experts
    from ppap_fast.experts.checkpoint import BaseMismatchWarning, _base_fingerprint

    cfg = json.loads((WEIGHTS_DIR / folder / "config.json").read_text())
    assert set(cfg["files"]) == {"experts.safetensors"}
    task = {"segnet": "segmentation", "semseg": "semantic"}.get(teacher, "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = load_experts(WEIGHTS_DIR / folder, load_teacher(task=task))
    assert cfg["base_state"] == _base_fingerprint(bank)
    other = load_teacher(task=task)
    with torch.no_grad():
        next(p for p in other.parameters() if p.is_floating_point()).add_(1.0)
    with pytest.warns(BaseMismatchWarning):
        load_experts(WEIGHTS_DIR / folder, other)
    damaged = tmp_path / folder
    shutil.copytree(WEIGHTS_DIR / folder, damaged)
    data = bytearray((damaged / "experts.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "experts.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its config.json"):
        load_experts(damaged, load_teacher(task=task))


def test_demo_routes_a_ppap_bank_by_its_own_timestep_count(tmp_path):
    """A bank distilled with T=500 routes t=150 to expert 1 of 5; the demo's merged router used T=1000."""
    import shutil

    from ppap_fast import ExpertBank
    from ppap_fast.demo import load_classifier
    from ppap_fast.experts import save_experts

    shutil.copy(WEIGHTS_DIR / "classifier.safetensors", tmp_path / "classifier.safetensors")
    bank = ExpertBank(load_classifier(), n_experts=5, num_timesteps=500)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bank.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    save_experts(bank.eval(), tmp_path / "ppap5")
    model, _, _ = load_guide_model(tmp_path, "ppap-5")
    x = torch.randn(4, 1, 16, 16, generator=gen)
    t = torch.tensor([0, 150, 250, 499])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), bank(x, t), rtol=1e-4, atol=1e-4)
