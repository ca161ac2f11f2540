"""ppap_fast.distill's Python entry points with models other than the demo's."""
import contextlib

import numpy as np
import pytest
import torch

from ppap_fast.distill import generate_datafree
from ppap_fast.models.tiny import TinyResNet


def _unet(channels, size):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


@contextlib.contextmanager
def _stopped_after_first_shard(monkeypatch):
    """The block's generate_datafree interrupted (KeyboardInterrupt) in ShardWriter.run right after shard 0 is written."""
    from ppap_fast.data import shards

    real_write = shards.write_npz_atomic

    def write_then_stop(path, **arrays):
        real_write(path, **arrays)
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(shards, "write_npz_atomic", write_then_stop)
        yield


class _Eps(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def forward(self, x, t):
        return self.inner(x, t).sample


def test_generate_datafree_samples_the_unets_image_shape(tmp_path):
    # x_T was always (n, 1, 16, 16): a 3-channel UNet failed deep in its first conv, a 1-channel 8x8 one
    # silently wrote 16x16 images
    from ppap_fast.data import load_shards

    unet, teacher = _unet(3, 8), TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=3, num_classes=3)
    generate_datafree(unet, teacher, tmp_path / "a", 2, 2, respacing="ddim2", progress=False)
    assert load_shards(tmp_path / "a")["images"].shape == (2, 8, 8, 3)
    gray = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    generate_datafree(_unet(1, 8), gray, tmp_path / "b", 2, 2, respacing="ddim2", progress=False)
    assert load_shards(tmp_path / "b")["images"].shape == (2, 8, 8, 1)
    wrapped = _Eps(_unet(1, 8))  # no config: the shape is asked for
    with pytest.raises(ValueError, match=r"pass image_shape=\(C, H, W\)"):
        generate_datafree(wrapped, gray, tmp_path / "c", 2, 2, respacing="ddim2", progress=False)
    generate_datafree(wrapped, gray, tmp_path / "c", 2, 2, respacing="ddim2", progress=False, image_shape=(1, 4, 4))
    assert load_shards(tmp_path / "c")["images"].shape == (2, 4, 4, 1)


@pytest.mark.parametrize("temperature", [0.0, -0.25, float("inf"), float("nan")])
def test_distillation_temperature_must_be_positive_and_finite(temperature):
    # 0 gave a NaN loss with no error, a negative one a target favouring the least likely classes
    from ppap_fast.distill import distill_loss, distill_loss_per_sample, kd_loss, pixel_kd_loss

    s, t = torch.randn(2, 5), torch.randn(2, 5)
    for loss in (lambda: kd_loss(s, t, temperature), lambda: distill_loss("kl", s, t, temperature),
                 lambda: distill_loss_per_sample("kl", s, t, temperature),
                 lambda: pixel_kd_loss(s[..., None], t[..., None], temperature),
                 lambda: distill_loss_per_sample("pixel_kl", s[..., None], t[..., None], temperature)):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            loss()


def test_kd_loss_refuses_teacher_logits_of_another_shape():
    # kd_loss broadcast teacher logits [B, 1] or [1, K] against the student's [B, K]: a wrong loss, no error
    from ppap_fast.distill import kd_loss, kd_loss_per_sample

    s, t = torch.randn(4, 10), torch.randn(4, 10)
    for bad in (t[:, :1], t[:1]):
        for loss in (kd_loss, kd_loss_per_sample):
            with pytest.raises(ValueError, match=r"kl loss: the student's output has shape \(4, 10\)"):
                loss(s, bad)
    with pytest.raises(ValueError, match=r"kl loss takes \[B, K\] logits"):
        kd_loss(s[..., None], t[..., None])
    assert kd_loss_per_sample(s, t).shape == (4,)


def test_distillation_losses_refuse_an_empty_batch():
    # their batch mean was NaN without an error
    from ppap_fast.distill import dense_mse_loss, kd_loss, pixel_kd_loss

    for loss, shape in ((kd_loss, (0, 10)), (pixel_kd_loss, (0, 3, 4, 4)), (dense_mse_loss, (0, 1, 4, 4))):
        with pytest.raises(ValueError, match="loss of an empty batch"):
            loss(torch.randn(shape), torch.randn(shape))
        ok = loss(torch.randn(2, *shape[1:]), torch.randn(2, *shape[1:]))
        assert torch.isfinite(ok)


def test_a_set_of_a_fractional_image_count_is_refused(tmp_path):
    # ShardWriter truncated 3.5 images to 3 silently
    from ppap_fast.data import ShardWriter

    for bad in ({"num_images": 3.5, "shard_size": 2}, {"num_images": 4, "shard_size": 2.0},
                {"num_images": True, "shard_size": 2}, {"num_images": 0, "shard_size": 2}):
        with pytest.raises(ValueError, match="num_images and shard_size must be positive ints"):
            ShardWriter(tmp_path / "s", **bad)
    assert ShardWriter(tmp_path / "s", np.int64(4), 2).num_shards == 2


def test_smooth_losses_window_must_be_positive():
    # window 0 returned all NaN without an error
    from ppap_fast.distill import smooth_losses

    assert smooth_losses([1.0, 3.0, float("nan"), 5.0], 2).tolist() == [1.0, 2.0, 3.0, 5.0]
    for w in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            smooth_losses([1.0, 2.0], w)


def test_generate_datafree_refuses_non_finite_teacher_logits(tmp_path):
    # a teacher giving NaN / Inf (an fp16 overflow) had them cached as the distillation targets, silently
    import numpy as np

    from ppap_fast.distill import teacher_logits

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    assert np.isfinite(teacher_logits(teacher, images, batch_size=2)).all()
    with torch.no_grad():
        teacher.fc.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"teacher logits \(3, 3\) hold 3 non-finite values"):
        teacher_logits(teacher, images, batch_size=2)
    with pytest.raises(ValueError, match="non-finite"):
        generate_datafree(_unet(1, 8), teacher, tmp_path / "a", 2, 2, respacing="ddim2", progress=False)


def test_distill_ppap_refuses_non_finite_cached_logits(tmp_path, monkeypatch):
    # a set caching NaN logits (written before generate_datafree checked them) trained every expert to NaN
    import numpy as np

    from ppap_fast import distill

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    real = distill.teacher_logits
    monkeypatch.setattr(distill, "teacher_logits", lambda *a, **k: np.full_like(real(*a, **k), np.nan))
    generate_datafree(_unet(1, 8), teacher, tmp_path / "set", 4, 2, respacing="ddim2", progress=False)
    monkeypatch.setattr(distill, "teacher_logits", real)
    with pytest.raises(ValueError, match=r"the teacher logits cached in .*set hold NaN / Inf"):
        distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=2, batch_size=2, progress=False)


def test_distill_ppap_refuses_non_finite_cached_dense_logits(tmp_path, monkeypatch):
    # a segmentation teacher's cached logits [N, K, H, W] holding NaN: the error's row listing raised an IndexError
    from ppap_fast import distill
    from ppap_fast.models.tiny import SegNet

    teacher = SegNet(width=4, depth=1)
    real = distill.teacher_logits
    monkeypatch.setattr(distill, "teacher_logits", lambda *a, **k: np.full_like(real(*a, **k), np.nan))
    generate_datafree(_unet(1, 8), teacher, tmp_path / "set", 4, 2, respacing="ddim2", progress=False)
    monkeypatch.setattr(distill, "teacher_logits", real)
    with pytest.raises(ValueError, match=r"the teacher logits cached in .*set hold NaN / Inf \(rows \[\d"):
        distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=2, batch_size=2, progress=False,
                             loss="pixel_kl")


def test_distill_ppap_refuses_a_set_of_another_schedule(tmp_path):
    """A set made by `ppap_fast.distributed generate --schedule cosine` (or another T) records it in its manifest;
    distill_ppap noised its images with linear-1000 anyway (wrong x_t for every sample, no error)."""
    import json

    from ppap_fast import distill

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    generate_datafree(_unet(1, 8), teacher, tmp_path / "set", 4, 2, respacing="ddim2", progress=False)
    manifest = tmp_path / "set" / "manifest.json"
    meta = json.loads(manifest.read_text())
    for config in ({"schedule": "cosine", "num_timesteps": 1000}, {"schedule": "linear", "num_timesteps": 4000}):
        manifest.write_text(json.dumps({**meta, "config": config}))
        with pytest.raises(ValueError, match=rf"generated by a {config['schedule']} {config['num_timesteps']}-step "
                                             r"diffusion model.*ppap_fast.distributed distill"):
            distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
    for bad in ("1000", True, 0):  # "1000" was refused as 'a linear 1000-step model'
        manifest.write_text(json.dumps({**meta, "config": {"schedule": "linear", "num_timesteps": bad}}))
        with pytest.raises(ValueError, match=r"manifest.json: config.num_timesteps must be a positive int"):
            distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
    manifest.write_text(json.dumps({**meta, "config": {"schedule": "linear", "num_timesteps": 1000}}))
    bank = distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
    assert bank.trained_steps == 1


def test_generate_datafree_samples_with_the_unets_schedule(tmp_path, monkeypatch):
    """generate_datafree sampled with the linear schedule whatever the diffusion model was trained with: a cosine
    model's set is now sampled with cosine, recorded, refused by distill_ppap (it noises linearly) and by a
    resume with another schedule; a set made before the record is linear."""
    import json

    from ppap_fast import distill
    from ppap_fast.schedule import Schedule

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    used = []
    real_loop = distill.sample_loop
    monkeypatch.setattr(distill, "sample_loop", lambda unet, x, sched, **kw: used.append(sched) or real_loop(
        unet, x, sched, **kw))
    generate_datafree(_unet(1, 8), teacher, tmp_path / "cos", 2, 2, respacing="ddim2", progress=False,
                      schedule="cosine")
    want = Schedule.create("cosine", 1000, respacing="ddim2")
    assert len(used) == 1 and torch.equal(used[0].alphas_cumprod, want.alphas_cumprod)
    assert not torch.equal(want.alphas_cumprod, Schedule.create("linear", 1000, respacing="ddim2").alphas_cumprod)
    assert json.loads((tmp_path / "cos" / "manifest.json").read_text())["schedule"] == "cosine"
    with pytest.raises(ValueError, match=r"generated by a cosine 1000-step diffusion model"):
        distill.distill_ppap(teacher, tmp_path / "cos", n_experts=2, steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"unknown beta schedule 'cosin': expected one of \['linear', 'cosine'\]"):
        generate_datafree(_unet(1, 8), teacher, tmp_path / "typo", 2, 2, respacing="ddim2", progress=False,
                          schedule="cosin")
    assert not (tmp_path / "typo").exists()
    manifest = tmp_path / "lin" / "manifest.json"
    with _stopped_after_first_shard(monkeypatch):
        generate_datafree(_unet(1, 8), teacher, tmp_path / "lin", 4, 2, respacing="ddim2", progress=False)
    assert json.loads(manifest.read_text())["schedule"] == "linear"
    with pytest.raises(ValueError, match=r"made with other settings \(schedule: 'linear' there vs 'cosine' now\)"):
        generate_datafree(_unet(1, 8), teacher, tmp_path / "lin", 4, 2, respacing="ddim2", progress=False,
                          schedule="cosine")
    older = json.loads(manifest.read_text())
    del older["schedule"]
    manifest.write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"made with the linear schedule \(before the schedule was recorded\), not "
                                         r"'cosine'; use schedule='linear' or another directory"):
        generate_datafree(_unet(1, 8), teacher, tmp_path / "lin", 4, 2, respacing="ddim2", progress=False,
                          schedule="cosine")
    assert generate_datafree(_unet(1, 8), teacher, tmp_path / "lin", 4, 2, respacing="ddim2", progress=False) == [1]
    bank = distill.distill_ppap(teacher, tmp_path / "lin", n_experts=2, steps=1, batch_size=2, progress=False)
    assert bank.trained_steps == 1


def test_generate_datafree_leaves_the_callers_models_as_they_were(tmp_path, monkeypatch):
    """generate_datafree moved the caller's unet and teacher to ``device`` for good and left them in eval mode:
    they keep their modes (each submodule's) and are not moved; one that is elsewhere runs as a copy there."""
    from ppap_fast import distill
    from ppap_fast.data import load_shards

    unet = _unet(1, 8).train()
    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3).train()
    frozen = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()
    modes = [m.training for m in (*unet.modules(), *teacher.modules())]
    used = []  # (model, whether it was in train mode) as sampling and the teacher's logits got it
    real_loop, real_logits = distill.sample_loop, distill.teacher_logits
    monkeypatch.setattr(distill, "sample_loop", lambda m, *a, **k: used.append((m, m.training)) or real_loop(
        m, *a, **k))
    monkeypatch.setattr(distill, "teacher_logits", lambda m, *a, **k: used.append((m, m.training)) or real_logits(
        m, *a, **k))
    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(self) or real_to(self, *a, **k))
    generate_datafree(unet, teacher, tmp_path / "a", 2, 2, respacing="ddim2", progress=False)
    assert used == [(unet, False), (teacher, False)]  # on the device already: themselves, in eval mode
    assert [m.training for m in (*unet.modules(), *teacher.modules())] == modes and not frozen.training
    assert not any(m is unet or m is teacher for m in moved)
    used.clear()
    monkeypatch.setattr(distill, "_is_on", lambda module, device: module is not unet)  # the unet "elsewhere"
    generate_datafree(unet, teacher, tmp_path / "b", 2, 2, respacing="ddim2", progress=False)
    assert used[0][0] is not unet and used[0][1] is False and used[1] == (teacher, False)
    assert any(m is used[0][0] for m in moved) and not any(m is unet or m is teacher for m in moved)
    assert [m.training for m in (*unet.modules(), *teacher.modules())] == modes
    assert np.array_equal(load_shards(tmp_path / "b")["images"], load_shards(tmp_path / "a")["images"])


def test_distill_ppap_bank_is_recorded_raw(tmp_path):
    """distill_ppap trains on raw x_t but returned a bank with no input transform record: a guide through a
    normalisation ran silently, and save_experts without input_transform= recorded nothing."""
    from ppap_fast import distill
    from ppap_fast.experts import save_experts
    from ppap_fast.experts.checkpoint import read_config
    from ppap_fast.guidance import ClassGuide, input_transform

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    generate_datafree(_unet(1, 8), teacher, tmp_path / "set", 4, 2, respacing="ddim2", progress=False)
    bank = distill.distill_ppap(teacher, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
    assert bank.input_transform_record == {"raw": True}
    with pytest.raises(ValueError, match=r"distilled through raw x_t.*pass input_transform=None"):
        ClassGuide(bank, 1, input_transform=input_transform((0.5,), (0.5,), 8))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    g = ClassGuide(bank, 1)(x, torch.tensor([10, 900]))
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    save_experts(bank, tmp_path / "ck")
    assert read_config(tmp_path / "ck")["input_transform"] == {"raw": True}


def test_distill_ppap_refuses_a_set_whose_teacher_saw_transformed_images(tmp_path):
    """`ppap_fast.distributed generate --teacher resnet18` caches model(transform(x0)) (resized to 224, ImageNet
    normalised) under the bare model's fingerprint: distill_ppap(model, set) trained raw-x_t experts on them."""
    import json

    import ppap_fast.distributed as D
    from ppap_fast import distill
    from ppap_fast.data import from_uint8, load_shards

    D.generate(D.GenerateConfig(str(tmp_path / "set"), num_images=2, shard_size=2, image_size=8, channels=3,
                                denoiser="random-conv", respacing="ddim2", seed=3, device="cpu",
                                teacher="resnet18"), D.DistEnv())
    built = D.build_teacher("resnet18")
    d = load_shards(tmp_path / "set")
    with torch.no_grad():
        x0 = from_uint8(d["images"])
        assert np.allclose(d["logits"], built.model(built.transform(x0)).numpy(), atol=1e-5)
        assert not np.allclose(d["logits"], built.model(x0).numpy(), atol=1e-2)  # what the student was matched to
    with pytest.raises(ValueError, match=r"are 'resnet18''s on its input transform .*ppap_fast.distributed distill "
                                         r"--teacher resnet18"):
        distill.distill_ppap(built.model, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
    manifest = tmp_path / "set" / "manifest.json"
    meta = json.loads(manifest.read_text())
    for raw in ("tiny:t.safetensors", "py:pkg.mod:factory"):  # teachers that take [-1, 1] images as they are
        manifest.write_text(json.dumps({**meta, "config": {**meta["config"], "teacher": raw}}))
        bank = distill.distill_ppap(built.model, tmp_path / "set", n_experts=2, steps=1, batch_size=2, progress=False)
        assert bank.trained_steps == 1


def test_distill_ppap_refuses_a_damaged_shard_reading_each_file_once(tmp_path, monkeypatch, capsys):
    """distill_ppap never checked the shards' CRC-32 (only the CLI and distributed --verify-data did): a byte flipped
    in a shard's image data trained silently. It now reads every file whole once before training, with the CLI's
    bar; verify=False skips the check."""
    from pathlib import Path

    from ppap_fast import distill
    from ppap_fast.data import shards

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    data = tmp_path / "set"  # 48 x 48: members past zipfile's 4 KiB first read (which checks a small one's CRC)
    generate_datafree(_unet(1, 48), teacher, data, 4, 2, respacing="ddim2", progress=False)
    reads = []
    real_crc = shards.crc_problem
    monkeypatch.setattr(shards, "crc_problem", lambda f: reads.append(Path(f).name) or real_crc(f))
    capsys.readouterr()
    bank = distill.distill_ppap(teacher, data, n_experts=2, steps=1, batch_size=2, progress=True)
    assert bank.trained_steps == 1 and reads == ["shard_00000.npz", "shard_00001.npz"]
    assert "verifying shards" in capsys.readouterr().err
    images = shards.npz_members(data / "shard_00001.npz")["images"]
    with open(images.path, "r+b") as f:  # the first pixel of shard 1: its zip directory and headers stay intact
        f.seek(images.offset)
        byte = f.read(1)[0]
        f.seek(images.offset)
        f.write(bytes([byte ^ 0xFF]))
    reads.clear()
    with pytest.raises(ValueError, match=r"^damaged data set .*set: .*shard_00001\.npz: member images\.npy fails its "
                                         r"CRC-32 check; remove the damaged shard file\(s\) and rerun generate"):
        distill.distill_ppap(teacher, data, n_experts=2, steps=1, batch_size=2, progress=False)
    assert reads == ["shard_00000.npz", "shard_00001.npz"]
    reads.clear()
    bank = distill.distill_ppap(teacher, data, n_experts=2, steps=1, batch_size=2, progress=False, verify=False)
    assert bank.trained_steps == 1 and reads == [] and np.isfinite(bank.train_losses).all()


def test_generate_datafree_records_its_device_type_and_resumes_only_on_it(tmp_path, monkeypatch):
    """The manifest did not record the device: a set begun on a GPU and finished on the CPU mixed the two devices'
    rounding silently and matched no uninterrupted run. A resume on another device type is refused; a finished set
    is only read (nothing sampled), and a set from before the record (device unknown) resumes as before."""
    import json

    from ppap_fast.info import data_set_summary

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)

    def generate(out):
        return generate_datafree(_unet(1, 8), teacher, out, 4, 2, respacing="ddim2", progress=False)

    data, manifest = tmp_path / "set", tmp_path / "set" / "manifest.json"
    with _stopped_after_first_shard(monkeypatch):
        generate(data)
    meta = json.loads(manifest.read_text())
    assert meta["device_type"] == "cpu"
    manifest.write_text(json.dumps({**meta, "device_type": "cuda"}))  # as if begun on a GPU
    with pytest.raises(ValueError, match=r"holds shards sampled on 'cuda', not 'cpu'.*finish it with device='cuda'"):
        generate(data)
    assert [p.name for p in data.glob("shard_*.npz")] == ["shard_00000.npz"]
    del meta["device_type"]  # a set written before the record
    manifest.write_text(json.dumps(meta))
    assert generate(data) == [1] and "device_type" not in json.loads(manifest.read_text())

    done = tmp_path / "done"
    assert generate(done) == [0, 1] and data_set_summary(done)["settings"]["device_type"] == "cpu"
    finished = json.loads((done / "manifest.json").read_text())
    (done / "manifest.json").write_text(json.dumps({**finished, "device_type": "cuda"}))
    before = (done / "manifest.json").read_bytes()
    assert generate(done) == [] and (done / "manifest.json").read_bytes() == before
    (done / "shard_00001.npz").unlink()  # a damaged shard removed: it would be resampled on the CPU
    with pytest.raises(ValueError, match=r"holds shards sampled on 'cuda', not 'cpu'"):
        generate(done)

    failed = tmp_path / "failed"  # a run stopped before its first shard: nothing to mix with, starts afresh
    failed.mkdir()
    (failed / "manifest.json").write_text(json.dumps({**finished, "device_type": "cuda", "complete": False}))
    assert generate(failed) == [0, 1] and json.loads((failed / "manifest.json").read_text())["device_type"] == "cpu"


def test_distill_ppap_resume_refuses_shards_replaced_since_its_state(tmp_path, monkeypatch):
    """The state identified the set by its manifest alone: shards swapped after a kill (valid CRCs, same row counts)
    trained the rest on other data silently. A resume compares the shards' zip CRC-32s the state recorded; a state
    from before the record resumes as before."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ppap_fast import distributed as D
    from ppap_fast.distill import distill_ppap

    teacher = TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3)
    data, state = tmp_path / "set", tmp_path / "state.safetensors"
    generate_datafree(_unet(1, 8), teacher, data, 4, 2, respacing="ddim2", progress=False)
    kw = dict(n_experts=2, r=2, alpha=2.0, steps=2, batch_size=2, progress=False, checkpoint_path=state,
              checkpoint_every=1)
    with monkeypatch.context() as m:
        m.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "1")
        m.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
        with pytest.raises(D.SimulatedCrash):
            distill_ppap(teacher, data, **kw)
    a, b, tmp = data / "shard_00000.npz", data / "shard_00001.npz", data / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(ValueError, match=r"set: shard\(s\) shard_00000.npz, shard_00001.npz differ from those .*state"
                                         r"\.safetensors was trained on .*restore them, or remove"):
        distill_ppap(teacher, data, **kw)
    with safe_open(str(state), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["step"] == "1"
    del meta[D.DATA_SHARD_CRCS]  # a state written before the record: not checked
    save_file(tensors, str(state), metadata=meta)
    bank = distill_ppap(teacher, data, **kw)
    assert (bank.resumed_from_step, bank.trained_steps) == (1, 2) and np.isfinite(bank.train_losses).all()


def test_distill_ppap_takes_no_after_state_check_hook():
    """after_state_check was passed by nothing (package, examples, benchmarks, tests): a dead parameter, removed."""
    import inspect

    from ppap_fast.distill import distill_ppap

    params = inspect.signature(distill_ppap).parameters
    assert "after_state_check" not in params and list(params)[-2:] == ["loss", "verify"]
