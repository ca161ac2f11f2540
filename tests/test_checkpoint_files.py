"""Expert checkpoint files: atomic saves with recorded digests, and lookup in a local Hugging Face cache."""
import json

import pytest
import torch

from ppap_fast.experts import ExpertBank, Placement, load_experts, save_experts
from ppap_fast.experts.checkpoint import load_experts_into, read_config, resolve_checkpoint
from ppap_fast.models.tiny import TinyResNet

from _util import randomise_bank


def _bank(seed=0):
    torch.manual_seed(seed)
    net = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    torch.manual_seed(seed + 1)
    return randomise_bank(ExpertBank(net, "resnet", n_experts=4, r=2, alpha=1))


def _fresh():
    torch.manual_seed(123)
    return TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)


def _same(a, b):
    sa, sb = a.per_expert_state_dict(), b.per_expert_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_records_digests_and_round_trip(tmp_path):
    bank = _bank()
    save_experts(bank, tmp_path / "ck", include_base=True)
    cfg = read_config(tmp_path / "ck")
    assert set(cfg["files"]) == {"experts.safetensors", "base.safetensors"}
    assert cfg["files"]["experts.safetensors"]["bytes"] == (tmp_path / "ck" / "experts.safetensors").stat().st_size
    loaded = load_experts(tmp_path / "ck", _fresh())
    assert _same(loaded, bank)
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_rank_from_numpy_is_saved_and_a_bool_rank_refused(tmp_path):
    # r=np.int64(2) was refused ('must be a positive int'); r=True built rank-1 adapters
    import numpy as np

    torch.manual_seed(0)
    net = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    bank = ExpertBank(net, "resnet", n_experts=2, r=np.int64(2), alpha=1)
    assert type(bank.placement.r) is int and bank.placement.r == 2
    save_experts(bank, tmp_path / "ck")
    assert read_config(tmp_path / "ck")["r"] == 2 and _same(load_experts(tmp_path / "ck", _fresh()), bank)
    with pytest.raises(ValueError, match="Placement.r must be a positive int, got True"):
        ExpertBank(net, "resnet", n_experts=2, r=True)


@pytest.mark.parametrize("killed_in", ["save_safetensors_atomic", "write_json_atomic"])
def test_an_interrupted_overwrite_leaves_the_previous_checkpoint(tmp_path, monkeypatch, killed_in):
    """A save over a checkpoint killed before its config.json (the old experts file already moved
    aside, or the new one already in place) loads the previous checkpoint, with a warning; a save that
    completes then loads the new one and leaves no kept copies."""
    import ppap_fast.data.shards as shards

    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)

    def boom(*a, **k):
        raise KeyboardInterrupt

    _killed_save_leaves_bank0(monkeypatch, ck, killed_in, boom)
    with pytest.raises(KeyboardInterrupt):  # killed again: the kept copy stays the committed one
        monkeypatch.setattr(shards, killed_in, boom)
        save_experts(_bank(2), ck, include_base=True)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted"):
        assert _same(load_experts(ck, _fresh()), _bank(0))
    save_experts(_bank(1), ck, include_base=True)
    assert _same(load_experts(ck, _fresh()), _bank(1))
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]


def test_a_diverged_bank_is_not_saved_over_a_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck)
    bank = _bank(1)
    with torch.no_grad():
        bank.model.conv1.lora_B[1].view(-1)[0] = float("inf")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    with pytest.raises(ValueError, match=r"NaN / Inf.*conv1.lora_B \(1 non-finite\)"):
        save_experts(bank, ck)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # nothing written
    save_experts(bank, tmp_path / "inspect", allow_nonfinite=True)
    assert (tmp_path / "inspect" / "experts.safetensors").exists()


@pytest.mark.parametrize("other", ['{"model_type": "resnet", "num_labels": 10}', "[1, 2]", "not json"])
def test_a_folder_with_another_models_config_is_not_overwritten(tmp_path, other):
    """save_experts into a folder holding another model's config.json replaced that file."""
    d = tmp_path / "hf_model"
    d.mkdir()
    (d / "config.json").write_text(other)
    with pytest.raises(ValueError, match="holds a config.json that is not a ppap_fast experts checkpoint's"):
        save_experts(_bank(0), d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"] and (d / "config.json").read_text() == other
    save_experts(_bank(0), tmp_path / "ck")
    save_experts(_bank(1), tmp_path / "ck")  # over its own checkpoint: still fine
    assert _same(load_experts(tmp_path / "ck", _fresh()), _bank(1))


def test_output_that_is_a_file_is_named(tmp_path):
    """An existing file as the checkpoint directory (or a folder above it) was a bare errno."""
    f = tmp_path / "experts.safetensors"
    f.write_text("keep")
    for out in (f, f / "sub"):
        with pytest.raises(ValueError, match=f"save_experts: {f} is a file, not a directory"):
            save_experts(_bank(0), out)
    assert f.read_text() == "keep"


def test_damaged_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "ck"
    # a corrupted byte
    save_experts(_bank(0), ck)
    raw = bytearray((ck / "experts.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (ck / "experts.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        load_experts(ck, _fresh())


def _fake_hf_cache(root, repo, commit, files: dict):
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    for rel, src in files.items():
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snap


def test_load_from_local_hf_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bank = _bank(2)
    ck = save_experts(bank, tmp_path / "ck")
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _fake_hf_cache(cache, "org/ppap-tiny", commit,
                          {f"ppap3/{n}": ck / n for n in ("experts.safetensors", "config.json")})
    assert resolve_checkpoint("org/ppap-tiny", subfolder="ppap3", cache_dir=cache) == snap / "ppap3"
    loaded = load_experts("org/ppap-tiny", _fresh(), subfolder="ppap3", cache_dir=cache)
    assert _same(loaded, bank)
    assert json.loads((snap / "ppap3" / "config.json").read_text())["n_experts"] == 4
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        load_experts("org/not-there", _fresh(), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="no .*config.json"):
        load_experts("org/ppap-tiny", _fresh(), subfolder="ppap10", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        load_experts(tmp_path / "missing" / "dir", _fresh())


def test_damaged_base_leaves_the_bank_untouched(tmp_path):
    # the digests are checked before anything is copied: a damaged base file must not leave the
    # bank with the new experts but its old base weights (half-loaded)
    from ppap_fast.experts import load_experts_into

    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)
    raw = bytearray((ck / "base.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (ck / "base.safetensors").write_bytes(bytes(raw))
    target = _bank(1)
    before = {k: v.clone() for k, v in target.per_expert_state_dict().items()}
    with pytest.raises(ValueError, match="base.safetensors does not match its config.json"):
        load_experts_into(target, ck)
    after = target.per_expert_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)



def test_base_file_not_recorded_in_config_is_refused(tmp_path):
    # saving without include_base over a checkpoint that had one leaves the old base.safetensors;
    # config.json records no digest for it, so load_base=True must not load it unchecked
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)
    save_experts(_bank(1), ck, include_base=False)
    with pytest.raises(ValueError, match="base.safetensors"):
        load_experts(ck, _fresh(), load_base=True)


def test_experts_on_other_base_weights_warn(tmp_path):
    """The checkpoint records which frozen base it was distilled on: loading onto other base weights
    says so (a warning: a half-precision copy of the right classifier differs too); the right base is
    silent."""
    import warnings

    from ppap_fast.experts.checkpoint import BaseMismatchWarning

    torch.manual_seed(5)
    base = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    bank = randomise_bank(ExpertBank(base, "resnet", n_experts=4, r=2, alpha=1))
    save_experts(bank, tmp_path / "ck")
    assert read_config(tmp_path / "ck")["base_state"]
    same = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    same.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        assert _same(load_experts(tmp_path / "ck", same), bank)
    with pytest.warns(BaseMismatchWarning, match="other frozen base weights"):
        load_experts(tmp_path / "ck", _fresh())


def test_experts_on_another_architecture_refused(tmp_path):
    """Experts saved on one architecture (resnet18-like) are refused on a deeper one of the same class
    (resnet34-like: the placement's layers exist in both), not loaded with the other-weights warning; a
    half-precision copy of the right base still loads with the warning; a checkpoint saved before the
    architecture was recorded loads as before."""
    import warnings

    from ppap_fast.experts.checkpoint import BaseMismatchWarning

    torch.manual_seed(5)
    base = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    bank = randomise_bank(ExpertBank(base, "resnet", n_experts=4, r=2, alpha=1))
    save_experts(bank, tmp_path / "ck")
    deeper = TinyResNet(widths=(4, 8), layers=(2, 1), in_channels=1, num_classes=3)
    with pytest.raises(ValueError, match="trained on another architecture") as e:
        load_experts(tmp_path / "ck", deeper)
    assert "TinyResNet" in str(e.value)
    with pytest.warns(BaseMismatchWarning, match="other frozen base weights"):
        half = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
        half.load_state_dict(base.state_dict())
        load_experts(tmp_path / "ck", half.half())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["base_arch"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(BaseMismatchWarning, match="other frozen base weights"):
        load_experts(tmp_path / "ck", deeper)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        assert _same(load_experts(tmp_path / "ck", base), bank)


def test_load_refuses_values_the_bank_cannot_hold(tmp_path):
    from ppap_fast.experts.checkpoint import export_ppap_checkpoint, import_ppap_checkpoint

    bank = _bank()
    with torch.no_grad():
        bank.model.bn1.running_var[1].fill_(1e5)  # fine in fp32, inf in fp16
    save_experts(bank, tmp_path / "big")
    with pytest.raises(ValueError, match=r"bn1.running_var \(overflows torch.float16"):
        load_experts(tmp_path / "big", _fresh().half())
    assert _same(load_experts(tmp_path / "big", _fresh()), bank)  # fp32 holds it
    sd = export_ppap_checkpoint(bank, 1)
    half = ExpertBank(_fresh().half(), "resnet", n_experts=4, r=2, alpha=1)
    with pytest.raises(ValueError, match="overflows"):
        import_ppap_checkpoint(half, 1, sd, base="ignore")
    with pytest.raises(ValueError, match="overflows"):
        half.load_expert_state_dict(1, bank.expert_state_dict(1))
    # a NaN saved by a diverged run is refused on load, not run
    bank = _bank()
    with torch.no_grad():
        bank.model.conv1.lora_A[2].view(-1)[0] = float("nan")
    save_experts(bank, tmp_path / "nan", allow_nonfinite=True)
    with pytest.raises(ValueError, match=r"conv1.lora_A \(non-finite"):
        load_experts(tmp_path / "nan", _fresh())
    with pytest.raises(ValueError, match="non-finite"):
        _bank().load_expert_state_dict(0, bank.expert_state_dict(2))


def test_config_with_missing_or_malformed_entries_is_a_clear_error(tmp_path):
    save_experts(_bank(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for broken in ({**cfg, "files": None}, {k: v for k, v in cfg.items() if k != "placement"},
                   {**cfg, "n_experts": None}):
        (tmp_path / "ck" / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="damaged: missing or malformed entries"):
            load_experts(tmp_path / "ck", _fresh())


@pytest.mark.parametrize("key", ["n_experts", "num_timesteps"])
@pytest.mark.parametrize("value", [True, 0, -2])
def test_config_with_a_bool_or_non_positive_count_is_refused_naming_the_file(tmp_path, key, value):
    # true is an int in Python: n_experts: true was read as 1 (loaded into a 1-expert bank, or a TypeError deep in
    # torch); num_timesteps: true gave 'does not divide num_timesteps=True'. 0 / -2 passed read_config: load_experts
    # failed in ExpertBank ('n_experts must be a positive int, got 0'), which did not name the config file
    torch.manual_seed(0)
    bank = ExpertBank(_fresh(), "resnet", n_experts=1, r=2, alpha=1)
    save_experts(bank, tmp_path / "ck")
    f = tmp_path / "ck" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), key: value}))
    for load in (lambda: read_config(tmp_path / "ck"), lambda: load_experts(tmp_path / "ck", _fresh()),
                 lambda: load_experts_into(bank, tmp_path / "ck")):
        with pytest.raises(ValueError, match=rf"config.json is damaged: missing or malformed entries \['{key}'\]"):
            load()


@pytest.mark.parametrize("entry, why", [({"lora": 5}, r"missing or malformed entries \['placement\.lora'\]"),
                                         ({"r": "16"}, r"Placement\.r must be a positive int, got '16'"),
                                         ({"layout": "x"}, "unknown LoRA layout 'x'"),
                                         ({"extra": 1}, r"unknown Placement fields \['extra'\]")])
def test_config_with_a_malformed_placement_is_refused_naming_the_file(tmp_path, entry, why):
    """A damaged placement passed read_config: load_experts raised a TypeError or a ValueError that did not name
    the file."""
    torch.manual_seed(0)
    bank = ExpertBank(_fresh(), "resnet", n_experts=1, r=2, alpha=1)
    save_experts(bank, tmp_path / "ck")
    f = tmp_path / "ck" / "config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, "placement": {**cfg["placement"], **entry}}))
    for load in (lambda: read_config(tmp_path / "ck"), lambda: load_experts(tmp_path / "ck", _fresh()),
                 lambda: load_experts_into(bank, tmp_path / "ck")):
        with pytest.raises(ValueError, match=rf"config.json is damaged: (its placement cannot be read \()?{why}"):
            load()


def test_a_save_without_base_removes_the_kept_base_of_a_killed_save(tmp_path, monkeypatch):
    """A save with include_base killed after moving the committed files aside, then a completed save
    without base: the kept base copy (.base.safetensors.prev, as large as the model) goes too."""
    import ppap_fast.data.shards as shards

    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "save_safetensors_atomic", boom)
    with pytest.raises(KeyboardInterrupt):
        save_experts(_bank(1), ck, include_base=True)
    monkeypatch.undo()
    assert (ck / ".base.safetensors.prev").exists()
    save_experts(_bank(1), ck, include_base=False)
    assert _same(load_experts(ck, _fresh()), _bank(1))
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]


def test_experts_of_another_architecture_say_so(tmp_path):
    """Loading TinyResNet experts onto a SegNet said only 'placement names modules not in SegNet'."""
    from ppap_fast.models.tiny import SegNet

    save_experts(_bank(), tmp_path / "ck")
    with pytest.raises(ValueError, match="adapt a TinyResNet, not this SegNet"):
        load_experts(tmp_path / "ck", SegNet(width=4, depth=2))


def test_save_records_the_teachers_input_transform(tmp_path):
    """The input transform the experts were distilled through is recorded (None: raw x_t), compared to float32
    precision; not given, nothing is recorded (as before)."""
    from ppap_fast.experts.checkpoint import input_transform_record, same_input_transform
    from ppap_fast.guidance import input_transform

    bank = _bank()
    save_experts(bank, tmp_path / "raw", input_transform=None)
    assert read_config(tmp_path / "raw")["input_transform"] == {"raw": True}
    save_experts(bank, tmp_path / "norm", input_transform=input_transform((0.5,) * 3, (0.5,) * 3, 224))
    rec = read_config(tmp_path / "norm")["input_transform"]
    assert rec == {"raw": False, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [224, 224], "antialias": "auto"}
    save_experts(bank, tmp_path / "old")
    assert "input_transform" not in read_config(tmp_path / "old")
    f32 = torch.tensor((0.485, 0.456, 0.406)).tolist()  # float32 statistics of the same normalisation
    assert same_input_transform(input_transform_record(input_transform(size=224)),
                                input_transform_record(input_transform(f32, (0.229, 0.224, 0.225), 224)))
    for other in (None, input_transform(size=224), input_transform((0.5,) * 3, (0.5,) * 3, 256),
                  input_transform(None, None, 224)):
        assert not same_input_transform(rec, input_transform_record(other))
    assert input_transform_record(torch.nn.Identity()) is None  # not described: not recorded


def test_load_attaches_the_recorded_input_transform(tmp_path):
    """load_experts / load_experts_into attach the checkpoint's input transform record to the bank (None where
    nothing is recorded), so that library guides can compare it with theirs."""
    from ppap_fast.guidance import input_transform

    bank = _bank()
    assert bank.input_transform_record is None
    save_experts(bank, tmp_path / "raw", input_transform=None)
    save_experts(bank, tmp_path / "norm", input_transform=input_transform((0.5,) * 3, (0.5,) * 3, 224))
    save_experts(bank, tmp_path / "old")
    assert load_experts(tmp_path / "raw", _fresh()).input_transform_record == {"raw": True}
    norm = load_experts(tmp_path / "norm", _fresh()).input_transform_record
    assert norm == {"raw": False, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [224, 224], "antialias": "auto"}
    into = load_experts_into(_bank(1), tmp_path / "raw")
    assert into.input_transform_record == {"raw": True}
    assert load_experts_into(into, tmp_path / "old").input_transform_record is None  # not the previous one's
    assert load_experts(tmp_path / "old", _fresh()).input_transform_record is None


def test_a_resave_keeps_the_loaded_input_transform_and_a_malformed_record_is_refused(tmp_path):
    """save_experts without input_transform= on a loaded bank dropped its record (a re-save, e.g. after more
    training, then guided through any transform); a record with a string mean was attached as is and failed in
    the comparison with a TypeError."""
    from ppap_fast.guidance import input_transform

    save_experts(_bank(), tmp_path / "norm", input_transform=input_transform((0.5,) * 3, (0.5,) * 3, 224))
    save_experts(load_experts(tmp_path / "norm", _fresh()), tmp_path / "again")
    want = {"raw": False, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [224, 224], "antialias": "auto"}
    assert read_config(tmp_path / "again")["input_transform"] == want
    save_experts(load_experts(tmp_path / "norm", _fresh()), tmp_path / "raw", input_transform=None)  # given: wins
    assert read_config(tmp_path / "raw")["input_transform"] == {"raw": True}
    f = tmp_path / "norm" / "config.json"
    good = json.loads(f.read_text())
    for bad in ({**want, "mean": "x"}, {**want, "std": [0.5] * 2}, {**want, "size": [224]}, {"mean": [0.5]},
                {**want, "mean": None}, {**want, "size": [True, 224]}, {**want, "antialias": "yes"}, [1, 2]):
        f.write_text(json.dumps({**good, "input_transform": bad}))
        for load in (lambda: read_config(tmp_path / "norm"), lambda: load_experts(tmp_path / "norm", _fresh())):
            with pytest.raises(ValueError, match=r"config.json is damaged: missing or malformed entries "
                                                 r"\['input_transform'\]"):
                load()
    f.write_text(json.dumps({**good, "input_transform": {**want, "mean": None, "std": None, "size": None}}))
    assert load_experts(tmp_path / "norm", _fresh()).input_transform_record["mean"] is None  # [0, 1] images


def test_guides_refuse_loaded_experts_with_another_input_transform(tmp_path):
    """ClassGuide / SegmentationGuide / DenseRegressionGuide(loaded bank, input_transform=...) guided experts
    distilled on raw x_t through a normalisation (or the reverse) silently: refused at construction, one line;
    the recorded transform, or a checkpoint recording nothing, builds as before."""
    from ppap_fast.guidance import ClassGuide, DenseRegressionGuide, SegmentationGuide, input_transform

    bank = _bank()
    norm = input_transform((0.5,), (0.5,), 32)
    save_experts(bank, tmp_path / "raw", input_transform=None)
    save_experts(bank, tmp_path / "norm", input_transform=norm)
    save_experts(bank, tmp_path / "old")
    raw, normed, old = (load_experts(tmp_path / d, _fresh()) for d in ("raw", "norm", "old"))
    target = torch.zeros(8, 8, dtype=torch.long)
    for make in (lambda m, tf: ClassGuide(m, 1, input_transform=tf),
                 lambda m, tf: SegmentationGuide(m, target, input_transform=tf),
                 lambda m, tf: DenseRegressionGuide(m, target.float(), input_transform=tf)):
        with pytest.raises(ValueError, match=r"distilled through raw x_t in \[-1, 1\], but input_transform= gives "
                                             r"mean \[0.5\] / std \[0.5\] at 32x32: pass input_transform=None") as e:
            make(raw, norm)
        assert len(str(e.value).splitlines()) == 1
        with pytest.raises(ValueError, match=r"distilled through mean \[0.5\].*gives raw x_t"):
            make(normed, None)
        with pytest.raises(ValueError, match=r"gives \[0, 1\] images"):
            make(normed, input_transform(None, None, 32))
        for m, tf in ((raw, None), (normed, input_transform((0.5,), (0.5,), 32)), (old, norm), (old, None)):
            assert make(m, tf).model is m
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    g = ClassGuide(raw, 1, scale=2.0)(x, torch.tensor([10, 900]))
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_the_recorded_antialias_is_kept_and_checked(tmp_path):
    """input_transform() now antialiases by default ("auto"); experts distilled through antialias=False record it and
    refuse the new default (one line naming the value to pass); records made before antialias was recorded load
    and guide with either."""
    from ppap_fast.guidance import ClassGuide, input_transform

    save_experts(_bank(), tmp_path / "plain", input_transform=input_transform((0.5,), (0.5,), 32, antialias=False))
    cfg = read_config(tmp_path / "plain")
    assert cfg["input_transform"]["antialias"] is False
    plain = load_experts(tmp_path / "plain", _fresh())
    with pytest.raises(ValueError, match=r"^ClassGuide: these experts were distilled through mean \[0.5\] / std \[0.5\] "
                                         r"at 32x32 \(antialias=False\), but input_transform= gives mean \[0.5\] / "
                                         r"std \[0.5\] at 32x32: pass an input transform with antialias=False$"):
        ClassGuide(plain, 1, input_transform=input_transform((0.5,), (0.5,), 32))
    assert ClassGuide(plain, 1, input_transform=input_transform((0.5,), (0.5,), 32, antialias=False)).model is plain
    f = tmp_path / "plain" / "config.json"
    old = json.loads(f.read_text())
    del old["input_transform"]["antialias"]
    f.write_text(json.dumps(old))
    before = load_experts(tmp_path / "plain", _fresh())
    assert "antialias" not in before.input_transform_record
    for aa in ("auto", False, True):
        assert ClassGuide(before, 1, input_transform=input_transform((0.5,), (0.5,), 32, antialias=aa)).model is before


def test_an_antialias_given_as_1_or_numpy_true_is_recorded_as_true(tmp_path):
    """antialias=1 / numpy.True_ were accepted and recorded as given: numpy's was no JSON (the save failed), 1 was
    refused as a damaged record at load."""
    import numpy as np

    from ppap_fast.guidance import input_transform

    for i, aa in enumerate((1, np.True_)):
        tf = input_transform((0.5,), (0.5,), 32, antialias=aa)
        assert tf.antialias is True
        save_experts(_bank(), tmp_path / str(i), input_transform=tf)
        assert load_experts(tmp_path / str(i), _fresh()).input_transform_record["antialias"] is True


def test_one_input_transform_check_serves_guides_guide_models_and_guided_sample(monkeypatch):
    """The guides, GuideModel.guide and guided-sample each had their own copy of the recorded-transform check:
    all go through experts.checkpoint.check_input_transform, which names both transforms, the caller's reason
    and what to do in one line, and asks for neither when the transforms agree."""
    import re
    import types

    from ppap_fast import guided_sample
    from ppap_fast.experts import checkpoint
    from ppap_fast.guidance import ClassGuide, input_transform
    from ppap_fast.models.registry import GuideModel

    norm = input_transform((0.5,), (0.5,), 32)
    raw, normed = _bank(), _bank()
    raw.input_transform_record = {"raw": True}
    normed.input_transform_record = checkpoint.input_transform_record(norm)
    described = "mean [0.5] / std [0.5] at 32x32"

    def never(*_):
        raise AssertionError("asked for a reason or a hint where the transforms agree")

    checkpoint.check_input_transform(raw, None, reason=never, hint=never)
    checkpoint.check_input_transform(normed, input_transform((0.5,), (0.5,), 32), reason=never, hint=never)
    model = types.SimpleNamespace(transform=norm, name="tiny", weights=None)
    cfg = types.SimpleNamespace(experts="ck", raw_input=True, guide="resnet18", guide_weights=None)
    cases = [
        (lambda: checkpoint.check_input_transform(raw, norm),
         f"these experts were distilled through raw x_t in [-1, 1], but input_transform= gives {described}: "
         "pass input_transform=None"),
        (lambda: checkpoint.check_input_transform(normed, None, subject="X", sees="Y", reason=lambda: "why",
                                                  hint=lambda want: f"fix {want['size']}"),
         f"X were distilled through {described}, but Y raw x_t in [-1, 1] (why): fix [32, 32]"),
        (lambda: ClassGuide(raw, 1, input_transform=norm),
         f"ClassGuide: these experts were distilled through raw x_t in [-1, 1], but input_transform= gives "
         f"{described}: pass input_transform=None"),
        (lambda: GuideModel._check_experts_transform(model, raw, norm),
         f"these experts were distilled through raw x_t in [-1, 1], but this guide sees {described} "
         "(tiny's transform): pass transform=None"),
        (lambda: guided_sample._check_experts_transform(cfg, normed, None),
         f"the experts in ck were distilled through {described}, but this guide sees raw x_t in [-1, 1] "
         "(--raw-input): drop --raw-input"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()
    seen = []

    def spy(experts, transform, **kw):
        seen.append((experts, transform))
        raise RuntimeError("one check")

    monkeypatch.setattr(checkpoint, "check_input_transform", spy)
    for call, _ in cases[2:]:
        with pytest.raises(RuntimeError, match="^one check$"):
            call()
    assert seen == [(raw, norm), (raw, norm), (normed, None)]


def test_a_bank_of_another_rank_or_placement_is_refused_naming_only_what_differs(tmp_path):
    """The refusal printed both whole placements (every module name of a real model, twice) and the rank twice;
    what differed (r 2 vs 3) was buried in them."""
    save_experts(_bank(), tmp_path / "ck")
    net = _fresh()
    other_rank = ExpertBank(net, "resnet", n_experts=4, r=3, alpha=1)
    with pytest.raises(ValueError, match=r"^checkpoint \S+ does not match the bank: placement\.r: checkpoint 2 vs bank 3$"):
        load_experts_into(other_rank, tmp_path / "ck")
    full = ExpertBank(net, "resnet", n_experts=2, r=2, alpha=1, layout="factorised")
    with pytest.raises(ValueError) as e:
        load_experts_into(full, tmp_path / "ck")
    msg = str(e.value)
    assert msg.endswith("placement.layout: checkpoint 'loralib' vs bank 'factorised'; n_experts: checkpoint 4 vs bank 2")
    fewer = Placement.from_dict({**_bank().placement.to_dict(), "lora": list(_bank().placement.lora[1:])})
    with pytest.raises(ValueError, match=r"does not match the bank: placement\.lora: 1 module\(s\) only in the "
                                         r"checkpoint \['[\w.]+'\], 0 only in the bank \[\]$"):
        load_experts_into(ExpertBank(net, fewer, n_experts=4), tmp_path / "ck")


def test_text_files_are_utf8_under_a_non_utf8_locale(tmp_path):
    """read_text() / write_text() used the locale's encoding: under LC_ALL=C a config.json holding a non-ASCII
    value was 'not valid JSON', and a rank's non-ASCII traceback was never recorded."""
    import os
    import subprocess
    import sys

    save_experts(_bank(), tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    cfg_file.write_bytes(json.dumps({**cfg, "note": "caf\u00e9 \u2713"}, ensure_ascii=False).encode("utf-8"))
    script = f"""
import locale, sys
from pathlib import Path
assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii"), locale.getpreferredencoding(False)
from ppap_fast.distributed import _rank_error, _record_rank_error
from ppap_fast.experts.checkpoint import read_config
d = Path({str(tmp_path)!r})
assert read_config(d / "ck")["note"] == "caf\\u00e9 \\u2713"
try:
    raise RuntimeError("r\\u00e9sum\\u00e9")
except RuntimeError:
    _record_rank_error(str(d), 0)
assert "RuntimeError: r\\u00e9sum\\u00e9" in _rank_error(None, str(d), 0, exited=False)[1]
print("ok")
"""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         encoding="utf-8", timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_an_interrupted_overwrite_of_a_checkpoint_without_digests_leaves_it(tmp_path, monkeypatch):
    """A checkpoint whose config.json predates the recorded digests: a save over it killed before its new
    config.json loaded the new experts (and, killed between files, new experts with the old base) silently."""
    import ppap_fast.data.shards as shards

    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["files"]
    (ck / "config.json").write_text(json.dumps(cfg))
    real_write = shards.write_json_atomic

    def killed_before_the_new_config(path, obj, **k):  # the new bank's config (its other base weights)
        if obj["base_state"] != cfg["base_state"]:
            raise KeyboardInterrupt
        return real_write(path, obj, **k)

    _killed_save_leaves_bank0(monkeypatch, ck, "write_json_atomic", killed_before_the_new_config)
    save_experts(_bank(1), ck, include_base=True)
    assert _same(load_experts(ck, _fresh()), _bank(1))


def _killed_save_leaves_bank0(monkeypatch, ck, killed_in: str, kill) -> None:
    """save_experts(_bank(1)) over ck (holding _bank(0)) with shards.<killed_in> replaced by kill (raising
    KeyboardInterrupt): ck still loads _bank(0), with the interrupted-save warning."""
    from ppap_fast.data import shards

    monkeypatch.setattr(shards, killed_in, kill)
    with pytest.raises(KeyboardInterrupt):
        save_experts(_bank(1), ck, include_base=True)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted before its config.json"):
        loaded = load_experts(ck, _fresh())
    assert _same(loaded, _bank(0))


def _saved_with_config_edit(tmp_path, edit):
    """A checkpoint of _bank(0) in tmp_path / 'ck' whose config.json went through edit(cfg)."""
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@pytest.mark.parametrize("version, fix", [(2, "upgrade ppap_fast to load it"), (0, "save the experts again"),
                                          (None, "save the experts again"), (True, "save the experts again")])
def test_a_checkpoint_of_another_version_says_what_to_do(tmp_path, version, fix):
    ck = _saved_with_config_edit(tmp_path, lambda cfg: cfg.update(version=version))
    with pytest.raises(ValueError, match=rf"unsupported checkpoint version {version!r} \(this ppap_fast reads "
                                         rf"version 1\): .*{fix}"):
        load_experts(ck, _fresh())


def test_a_checkpoint_missing_a_file_is_refused_saying_what_to_do(tmp_path):
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck, include_base=True)
    (ck / "base.safetensors").unlink()
    bank = _bank(1)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*ck has no base.safetensors \(cut mid-copy or "
                                                r"mid-save\?\): copy it whole again, or save the experts again"):
        load_experts_into(bank, ck)
    assert _same(bank, _bank(1))


def test_base_asked_of_a_checkpoint_saved_without_it(tmp_path):
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck)
    with pytest.raises(FileNotFoundError, match=r"base.safetensors not found: the experts were saved without "
                                                r"include_base; pass load_base=False, or save them again"):
        load_experts_into(_bank(1), ck, load_base=True)


@pytest.mark.parametrize("record", ["abc", {"bytes": 1}, None, 5, {"bytes": "1", "sha256": "00"}])
def test_a_malformed_file_record_is_refused_naming_it(tmp_path, record):
    ck = _saved_with_config_edit(tmp_path, lambda cfg: cfg["files"].update({"experts.safetensors": record}))
    with pytest.raises(ValueError, match=r"config.json is damaged: missing or malformed entries "
                                         r"\['files.experts.safetensors'\]"):
        load_experts(ck, _fresh())


def test_a_checkpoint_file_given_for_its_folder_says_what_to_pass(tmp_path):
    ck = tmp_path / "ck"
    save_experts(_bank(0), ck)
    with pytest.raises(NotADirectoryError, match=r"experts.safetensors is a file, not a checkpoint directory: pass "
                                                 r"the folder save_experts wrote \(the one holding config.json\)"):
        load_experts(ck / "experts.safetensors", _fresh())
    with pytest.raises(NotADirectoryError, match=r"ck.nope is missing, not a checkpoint directory"):
        load_experts(ck, _fresh(), subfolder="nope")
