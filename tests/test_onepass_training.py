"""All experts in one pass over a mixed-timestep batch == each expert trained on its own samples."""
import pytest
import torch
import torch.nn.functional as F

from ppap_fast.experts import ExpertBank
from ppap_fast.models.tiny import TinyResNet

from _util import rel_err


def _bank(n_experts, seed=0):
    torch.manual_seed(seed)
    model = TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=1, num_classes=5).double()
    bank = ExpertBank(model, placement="resnet", n_experts=n_experts, r=4, alpha=2).double()
    with torch.no_grad():  # non-zero LoRA B so every LoRA path carries gradient both ways
        for name, p in bank.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return bank.train()


def _kd(student, teacher):
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher / 0.25, -1), log_target=True, reduction="sum")


@pytest.mark.parametrize("t", [
    torch.tensor([5, 950, 420, 10, 610, 999, 333, 200]),   # random mix
    torch.tensor([100, 120, 5, 150, 199, 0, 42, 77]),      # all in expert 0, others empty
])
def test_onepass_equals_per_expert_passes(t):
    n = 5
    x = torch.randn(t.numel(), 1, 16, 16, dtype=torch.float64)
    teacher = torch.randn(t.numel(), 5, dtype=torch.float64)
    one = _bank(n)
    loss = _kd(one(x, t), teacher)
    loss.backward()
    grads_one = {k: p.grad.clone() for k, p in one.named_parameters() if p.requires_grad}

    sep = _bank(n)
    expert = t // (1000 // n)
    total = 0.0
    for e in range(n):
        rows = (expert == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        part = _kd(sep(x[rows], t[rows]), teacher[rows])
        part.backward()
        total += part.item()
    assert abs(loss.item() - total) <= 1e-10 * max(1.0, abs(total))
    checked = 0
    for k, p in sep.named_parameters():
        if not p.requires_grad:
            continue
        g_sep = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.isfinite(grads_one[k]).all()
        assert rel_err(grads_one[k], g_sep) <= 1e-10 or (g_sep.abs().max() == 0 and grads_one[k].abs().max() == 0), k
        checked += 1
    assert checked > 0
    # per-expert running BN statistics follow the same samples
    for (k, b1), (_, b2) in zip(one.named_buffers(), sep.named_buffers()):
        assert torch.allclose(b1, b2, rtol=1e-10, atol=1e-12), k


def test_onepass_on_the_implicit_kernels_equals_per_expert_passes(monkeypatch):
    """The same equivalence through the implicit conv LoRA kernels: one pass of a float32 bank whose
    loralib convs run as the equal block-diagonal factorised LoRA on Triton (interpreter on CPU) vs
    each expert's own float64 reference passes; every gradient within float32 rounding."""
    import functools
    import os

    from ppap_fast.ops import lora as L

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([5, 950, 420, 10, 610, 333])
    n = 5
    x = torch.randn(t.numel(), 1, 6, 6, dtype=torch.float64)  # small: the interpreter runs every program
    teacher = torch.randn(t.numel(), 5, dtype=torch.float64)

    sep = _bank(n)
    expert = t // (1000 // n)
    for e in range(n):
        rows = (expert == e).nonzero().flatten()
        if rows.numel():
            _kd(sep(x[rows], t[rows]), teacher[rows]).backward()

    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "factorised")
    monkeypatch.setattr(L, "lora_conv2d", functools.partial(L.lora_conv2d, backend="triton"))
    one = _bank(n).float().to(dev)
    _kd(one(x.float().to(dev), t.to(dev)), teacher.float().to(dev)).backward()
    assert L.last_backend["lora_conv2d/a_stage"] == "implicit"
    g_one = {k: p.grad for k, p in one.named_parameters() if p.requires_grad}
    floor = 1e-3 * max(float(p.grad.norm()) for p in sep.parameters() if p.grad is not None)
    checked = 0
    for k, p in sep.named_parameters():
        if not p.requires_grad:
            continue
        g_sep = p.grad if p.grad is not None else torch.zeros_like(p)
        diff = float((g_one[k].double().cpu() - g_sep).norm())
        assert diff <= 1e-4 * max(float(g_sep.norm()), floor), (k, diff, float(g_sep.norm()))
        checked += "lora_A" in k and g_sep.abs().max() > 0
    assert checked > 0


def test_step_sampled_experts_leaves_experts_without_samples_as_they_were():
    """AdamW with weight decay on the stacked [N, ...] tensors: an expert with no sample in the batch
    keeps its parameters and moments (trained separately, no step of its own would touch it); the
    sampled experts step exactly as a plain opt.step()."""
    n = 4
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    teacher = torch.randn(6, 5, dtype=torch.float64)
    mixed, no_expert_1 = torch.tensor([5, 400, 900, 10, 500, 990]), torch.tensor([5, 10, 900, 20, 990, 600])
    banks, opts = [], []
    for _ in range(2):
        b = _bank(n)
        banks.append(b)
        opts.append(torch.optim.AdamW(b.parameters_to_train(), lr=1e-2, weight_decay=0.05))
    for t in (mixed, no_expert_1):
        for b, o, masked in zip(banks, opts, (True, False)):
            o.zero_grad(set_to_none=True)
            _kd(b(x, t), teacher).backward()
            if not masked:
                o.step()
            elif t is no_expert_1:
                before = {k: v.clone() for k, v in b.expert_state_dict(1).items()}
                moments = {id(p): {k: v[1].clone() for k, v in o.state[p].items() if k != "step"}
                           for p in b.parameters_to_train()}
                b.step_sampled_experts(o, b.sampled_experts(t))
            else:
                b.step_sampled_experts(o, b.sampled_experts(t))
    masked, plain = banks
    assert masked.sampled_experts(no_expert_1).tolist() == [True, False, True, True]
    after = masked.expert_state_dict(1)
    assert all(torch.equal(after[k], before[k]) for k in before)
    for p in masked.parameters_to_train():
        assert all(torch.equal(opts[0].state[p][k][1], v) for k, v in moments[id(p)].items())
    moved = plain.expert_state_dict(1)
    assert any(not torch.equal(moved[k], before[k]) for k in before)  # what plain AdamW does
    for e in (0, 2, 3):
        a, b = masked.expert_state_dict(e), plain.expert_state_dict(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e


def test_step_sampled_experts_with_coupled_weight_decay_equals_separate_training():
    """SGD (momentum, weight_decay adds wd * p to the gradient): the first step created the momentum of the
    experts without samples from wd * p alone, which later moved them unlike separate training, where an
    expert's momentum starts at its own first step (SGD keeps no step count: one-pass equals it exactly)."""
    n = 4
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    teacher = torch.randn(6, 5, dtype=torch.float64)
    ts = [torch.tensor([5, 10, 900, 20, 990, 600]), torch.tensor([5, 400, 900, 10, 500, 990]),
          torch.tensor([300, 260, 5, 700, 499, 999])]  # expert 1 first sampled at the second step

    def sgd(bank):
        return torch.optim.SGD(bank.parameters_to_train(), lr=0.05, momentum=0.9, weight_decay=0.1)

    one = _bank(n)
    opt = sgd(one)
    for t in ts:
        opt.zero_grad(set_to_none=True)
        _kd(one(x, t), teacher).backward()
        one.step_sampled_experts(opt, one.sampled_experts(t))
    for e in range(n):
        sep = _bank(n)
        opt_e = sgd(sep)
        for t in ts:
            rows = (t // (1000 // n) == e).nonzero().flatten()
            if rows.numel():
                opt_e.zero_grad(set_to_none=True)
                _kd(sep(x[rows], t[rows]), teacher[rows]).backward()
                opt_e.step()
        got, want = one.expert_state_dict(e), sep.expert_state_dict(e)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14, msg=f"expert {e}: {k}")


def _kd_per_sample(student, teacher):
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher / 0.25, -1), log_target=True,
                    reduction="none").sum(-1)


def test_onepass_adamw_training_with_skipped_experts_equals_separate_training():
    """3 steps, 4 experts; experts 1 and 3 skip step 1, expert 2 skips step 2: one pass (expert-mean
    loss, ExpertAdamW via step_sampled_experts) == each expert trained alone by torch.optim.AdamW on
    the batch mean of its own samples, stepping only when it has some. With one step count shared by
    the experts (torch.optim.AdamW + the mask), a skipped expert's next update was scaled wrongly."""
    from ppap_fast.distill import expert_mean_loss
    from ppap_fast.experts import ExpertAdamW

    n, lr, wd = 4, 1e-2, 0.05
    ts = [torch.tensor([5, 300, 600, 900]), torch.tensor([10, 20, 700, 710]),
          torch.tensor([260, 280, 990, 30])]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64),
             torch.randn(4, 5, generator=g, dtype=torch.float64)) for _ in ts]

    one = _bank(n)
    opt = ExpertAdamW(one.parameters_to_train(), n, lr=lr, weight_decay=wd)
    for t, (x, teacher) in zip(ts, data):
        opt.zero_grad(set_to_none=True)
        e = one.expert_index(t)
        expert_mean_loss(_kd_per_sample(one(x, t), teacher), e, n).backward()
        one.step_sampled_experts(opt, one.sampled_experts(t))
    assert opt.state[one.parameters_to_train()[0]]["step"].tolist() == [3.0, 2.0, 2.0, 2.0]

    for ex in (1, 2):  # skipped, then stepped (its own count); skipped at the last step (0 and 3: the same kinds)
        sep = _bank(n)  # trains expert ex only; the other slices of its tensors are not compared
        sep_opt = torch.optim.AdamW(sep.parameters_to_train(), lr=lr, weight_decay=wd)
        for t, (x, teacher) in zip(ts, data):
            rows = (sep.expert_index(t) == ex).nonzero().flatten()
            if rows.numel():
                sep_opt.zero_grad(set_to_none=True)
                _kd_per_sample(sep(x[rows], t[rows]), teacher[rows]).mean().backward()
                sep_opt.step()
        mine, ref = one.expert_state_dict(ex), sep.expert_state_dict(ex)
        assert mine.keys() == ref.keys()
        for k in ref:
            assert torch.isfinite(mine[k]).all(), (ex, k)
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-9, atol=1e-12, msg=f"expert {ex}: {k}")


def _datafree_set(tmp_path):
    from ppap_fast import distributed as D
    from ppap_fast.models.tiny import save_model

    torch.manual_seed(0)
    teacher = TinyResNet(widths=(4,), layers=(1,), in_channels=1, num_classes=3).eval()
    tfile = save_model(teacher, tmp_path / "t.safetensors")
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), num_images=6, shard_size=3, image_size=8, channels=1,
                                denoiser="random-conv", respacing="ddim5", seed=3, device="cpu",
                                teacher=f"tiny:{tfile}"), D.DistEnv())
    return teacher, tfile, data


def _untouched_experts(bank, teacher):
    """Experts whose per-expert BatchNorm weight is still the teacher's (the init of every expert)."""
    w = dict(bank.per_expert_state_dict())["bn1.expert_weight"]
    return sum(torch.equal(w[e], teacher.bn1.weight) for e in range(bank.n_experts))


def test_distillers_move_only_the_experts_their_batches_sample(tmp_path):
    """batch 1, 5 experts, 2 steps: at most 2 experts see a sample, the other 3 must stay at their
    init (AdamW's weight decay shrank every expert at every step before)."""
    from ppap_fast import distributed as D
    from ppap_fast.distill import distill_ppap

    teacher, tfile, data = _datafree_set(tmp_path)
    bank = distill_ppap(teacher, data, n_experts=5, r=2, alpha=2.0, steps=2, batch_size=1, progress=False)
    assert _untouched_experts(bank, teacher) >= 3
    bank = D.distill(D.DistillConfig(str(data), str(tmp_path / "out"), f"tiny:{tfile}", n_experts=5, r=2, alpha=2.0,
                                     steps=2, batch_size=1, lr=1e-2, warmup=1, device="cpu"), D.DistEnv())
    assert _untouched_experts(bank, teacher) >= 3


def test_distillers_step_expert_mean_runs_with_per_expert_counts_and_batch_mean_runs_as_before(tmp_path, monkeypatch):
    """expert_mean (the default): ExpertAdamW, each expert its own step count; batch_mean: the plain
    torch.optim.AdamW of the runs that made the shipped experts (docs/demo.md), so they reproduce."""
    from ppap_fast import distributed as D
    from ppap_fast.distill import distill_ppap
    from ppap_fast.experts import ExpertAdamW

    teacher, tfile, data = _datafree_set(tmp_path)
    real, used = ExpertBank.step_sampled_experts, []

    def spy(self, opt, sampled):
        used.append(type(opt))
        return real(self, opt, sampled)

    monkeypatch.setattr(ExpertBank, "step_sampled_experts", spy)
    for reduction, want in (("expert_mean", ExpertAdamW), ("batch_mean", torch.optim.AdamW)):
        used.clear()
        distill_ppap(teacher, data, n_experts=5, r=2, alpha=2.0, steps=1, batch_size=1, progress=False,
                     loss_reduction=reduction)
        D.distill(D.DistillConfig(str(data), str(tmp_path / reduction), f"tiny:{tfile}", n_experts=5, r=2, alpha=2.0,
                                  steps=1, batch_size=1, lr=1e-2, warmup=1, device="cpu", loss_reduction=reduction),
                  D.DistEnv())
        assert used == [want, want], reduction


def test_resuming_a_shared_step_adamw_state_with_expert_adamw_is_refused(tmp_path):
    """A training state written by torch.optim.AdamW (one step count for all experts, the expert_mean
    runs before ExpertAdamW) cannot be resumed exactly: refused naming the file, not converted."""
    from ppap_fast import distributed as D
    from ppap_fast.experts import ExpertAdamW

    bank, gen, env = _bank(4), torch.Generator().manual_seed(0), D.DistEnv(device=torch.device("cpu"))
    old = torch.optim.AdamW(bank.parameters_to_train(), lr=1e-2)
    x, teacher = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    _kd(bank(x, torch.tensor([5, 700])), teacher).backward()
    old.step()
    path = tmp_path / "state.safetensors"
    D.save_train_state(path, bank, old, gen, 1, [0.5], {"k": 1}, "h", env)
    new = ExpertAdamW(bank.parameters_to_train(), 4, lr=1e-2)
    with pytest.raises(ValueError, match=r"state\.safetensors: optimizer state of parameter 0 has a step count of "
                                         r"shape \(\), not one per expert \[4\].*remove it to start over"):
        D.load_train_state(path, bank, new, gen, env)
    # an ExpertAdamW state resumes (per-expert counts survive the file)
    new.step(torch.tensor([True, False, True, False]))
    D.save_train_state(path, bank, new, gen, 2, [0.5, 0.4], {"k": 1}, "h", env)
    again = ExpertAdamW(bank.parameters_to_train(), 4, lr=1e-2)
    assert D.load_train_state(path, bank, again, gen, env)[0] == 2
    p = bank.parameters_to_train()[0]
    assert again.state[p]["step"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert all(torch.equal(again.state[p][k], new.state[p][k]) for k in new.state[p])


def test_ddp_ranks_agree_on_which_experts_step(tmp_path):
    """2 gloo ranks, batch 1 each: an expert sampled on one rank only gets the all-reduced gradient
    on both, so both must step it (a per-rank mask made the replicas diverge)."""
    from ppap_fast import distributed as D

    _, tfile, data = _datafree_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "out"), f"tiny:{tfile}", n_experts=5, r=2, alpha=2.0, steps=3,
                          batch_size=1, lr=1e-2, warmup=1, device="cpu")
    D.launch("distill", cfg, 2, threads=1, timeout_s=60)  # check_replicas_identical raises on divergence
    assert (tmp_path / "out" / "experts.safetensors").exists()


def _per_expert_close(g_one, g_sep, n, sampled, tol):
    """Each expert's slice of every stacked gradient within ``tol`` (relative); unsampled: zero."""
    checked = 0
    for k, g in g_sep.items():
        for e in range(n):
            if e in sampled:
                if g[e].abs().max() > 0:
                    assert rel_err(g_one[k][e], g[e]) <= tol, (k, e, rel_err(g_one[k][e], g[e]))
                    checked += 1
            else:
                assert g_one[k][e].abs().max() == 0 and g[e].abs().max() == 0, (k, e)
    assert checked > 0


@pytest.mark.parametrize("kind", ["kl", "pixel_kl", "mse"])
def test_onepass_expert_mean_loss_equals_separate_batch_mean_training(kind):
    """Uneven mix (experts 0..4 get 4, 1, 0, 2, 1 samples): one pass with the default reduction gives
    every expert the gradient of the batch-mean loss over its own samples, as training it alone on
    them; the batch mean (the old reduction) scales expert e by n_e / B. Dense losses: the mean over
    each sample's pixels first."""
    from ppap_fast.distill import distill_loss, distill_loss_per_sample, expert_counts, expert_mean_loss

    n = 5
    t = torch.tensor([5, 950, 120, 10, 610, 199, 333, 690])
    x = torch.randn(t.numel(), 1, 16, 16, dtype=torch.float64)
    pix = torch.rand(1, 1, 2, 3, dtype=torch.float64) + 0.5  # a dense output: logits scaled per pixel
    dense = (lambda y: y[:, :, None, None] * pix) if kind != "kl" else (lambda y: y)
    teacher = dense(torch.randn(t.numel(), 5, dtype=torch.float64))

    one = _bank(n)
    e = one.expert_index(t)
    assert expert_counts(e, n).tolist() == [4, 1, 0, 2, 1]
    per = distill_loss_per_sample(kind, dense(one(x, t)), teacher)
    assert per.shape == (t.numel(),) and per.dtype == torch.float64
    torch.testing.assert_close(per.mean(), distill_loss(kind, dense(one(x, t)), teacher), rtol=1e-12, atol=0)
    loss = expert_mean_loss(per, e, n)
    loss.backward()
    g_one = {k: p.grad.clone() for k, p in one.named_parameters() if p.requires_grad}

    sep, total = _bank(n), 0.0
    for ex in range(n):
        rows = (e == ex).nonzero().flatten()
        if rows.numel():
            part = distill_loss(kind, dense(sep(x[rows], t[rows])), teacher[rows])  # its own batch mean
            part.backward()
            total += part.item()
    assert abs(loss.item() - total) <= 1e-10 * abs(total)
    g_sep = {k: p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in sep.named_parameters() if p.requires_grad}
    _per_expert_close(g_one, g_sep, n, {0, 1, 3, 4}, 1e-10)
    # the batch mean is the same up to n_e / B per expert: what the default reduction removes
    old = _bank(n)
    expert_mean_loss(distill_loss_per_sample(kind, dense(old(x, t)), teacher), e, n, "batch_mean").backward()
    g_old = {k: p.grad for k, p in old.named_parameters() if p.requires_grad}
    k = next(k for k in g_sep if "lora_A" in k and g_sep[k][1].abs().max() > 0)
    torch.testing.assert_close(g_old[k][1], g_sep[k][1] / t.numel(), rtol=1e-10, atol=1e-14)


def test_expert_mean_loss_is_finite_and_weights_by_global_counts():
    """An expert without a sample takes no weight (no 0 / 0); DDP: with global counts and the world
    size, each rank's loss is world_size / n_e_global per sample."""
    from ppap_fast.distill import expert_counts, expert_mean_loss

    e = torch.tensor([0, 0, 3])
    per = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    loss = expert_mean_loss(per, e, 4)
    loss.backward()
    assert loss.item() == 1.5 + 4.0 and per.grad.tolist() == [0.5, 0.5, 1.0]
    counts = expert_counts(e, 4) + torch.tensor([2.0, 0.0, 0.0, 1.0])  # the other rank's samples
    assert expert_mean_loss(per.detach(), e, 4, counts=counts, world_size=2).item() == (3.0 / 4 + 4.0 / 2) * 2
    with pytest.raises(ValueError, match="world_size=2 needs the global counts"):  # local counts: 2x too large
        expert_mean_loss(per.detach(), e, 4, world_size=2)
    assert expert_mean_loss(per.detach(), e, 4, "batch_mean").item() == pytest.approx(7.0 / 3)
    with pytest.raises(ValueError, match="reduction"):
        expert_mean_loss(per, e, 4, "sum")


SPY_MODULE = '''
import os

import torch
import torch.nn as nn


def net():
    """A tiny depth network without BatchNorm (DDP's local batch statistics would differ from the
    union batch's): [B, 1, H, W] -> [B, 1, H, W]."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))


def make():
    """The teacher; in the distilling processes also: each rank trains on its share of the fixed
    union batches in PPAP_SPY_BATCHES, and every step's gradients (after DDP) and parameters
    (before the step) go to PPAP_SPY_OUT."""
    import ppap_fast.distributed as D
    from ppap_fast.experts import ExpertBank

    if os.environ.get("PPAP_SPY_OUT") and not getattr(ExpertBank, "_spied", False):
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        steps = [tuple(a.chunk(world)[rank] for a in b) for b in torch.load(os.environ["PPAP_SPY_BATCHES"])]

        class Fixed:
            def __init__(self, make, gen, count, prefetch=True):
                self.gen, self.k = gen, 0

            def take(self):
                self.k += 1
                return steps[self.k - 1]

            def generator_before_next(self):
                return self.gen

            def close(self):
                pass

        real, done = ExpertBank.step_sampled_experts, []

        def spy(self, opt, sampled):
            rec = {"sampled": sampled.clone()}
            for k, p in self.named_parameters():
                if p.requires_grad:
                    rec["param/" + k] = p.detach().clone()
                    rec["grad/" + k] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            torch.save(rec, os.path.join(os.environ["PPAP_SPY_OUT"], f"w{world}_rank{rank}_step{len(done)}.pt"))
            done.append(1)
            return real(self, opt, sampled)

        D.BatchStream, ExpertBank.step_sampled_experts, ExpertBank._spied = Fixed, spy, True
    return net()


make.task = "depth"
'''


def test_ddp_expert_mean_gradients_equal_one_rank_on_the_union_batch_and_separate_training(tmp_path, monkeypatch):
    """D.distill (mse, 4 experts) on fixed batches: 2 gloo ranks (4 samples each) vs 1 rank on the
    union batch (8): the same gradients after DDP's average and the same updates; and step 0's
    gradients equal each expert trained separately (float64) on the batch mean of its own samples.
    Step 0's experts get 4, 1, 0, 3 samples, expert 0's split 3 + 1 over the ranks (global counts)."""
    from ppap_fast import distributed as D
    from ppap_fast.experts import ExpertBank

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "ppap_onepass_spy.py").write_text(SPY_MODULE)
    monkeypatch.syspath_prepend(str(mods))  # spawned workers inherit sys.path and the environment
    spec = "py:ppap_onepass_spy:make"
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), num_images=4, shard_size=4, image_size=8, channels=1,
                                denoiser="random-conv", respacing="ddim5", device="cpu"), D.DistEnv())
    g = torch.Generator().manual_seed(5)
    ts = [torch.tensor([10, 300, 20, 30, 900, 40, 950, 980]), torch.tensor([600, 610, 5, 999, 620, 700, 260, 15])]
    batches = [(torch.randn(8, 1, 8, 8, generator=g), t, torch.randn(8, 1, 8, 8, generator=g)) for t in ts]
    torch.save(batches, tmp_path / "batches.pt")
    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv("PPAP_SPY_BATCHES", str(tmp_path / "batches.pt"))
    monkeypatch.setenv("PPAP_SPY_OUT", str(spy))
    kw = dict(n_experts=4, r=2, alpha=2.0, steps=2, lr=1e-2, warmup=1, device="cpu")
    D.launch("distill", D.DistillConfig(str(data), str(tmp_path / "one"), spec, batch_size=8, **kw), 1,
             threads=1, timeout_s=120)
    D.launch("distill", D.DistillConfig(str(data), str(tmp_path / "two"), spec, batch_size=4, **kw), 2,
             threads=1, timeout_s=120)
    monkeypatch.delenv("PPAP_SPY_OUT")
    rec = {(w, r, s): torch.load(spy / f"w{w}_rank{r}_step{s}.pt") for w, r in ((1, 0), (2, 0), (2, 1))
           for s in (0, 1)}
    for s in (0, 1):
        one = rec[1, 0, s]
        for r in (0, 1):
            two = rec[2, r, s]
            assert torch.equal(one["sampled"], two["sampled"])
            for k, v in one.items():
                if k.startswith(("grad/", "param/")):  # params of step 1: after the same update
                    assert rel_err(two[k], v) <= 1e-5 or (v.abs().max() == 0 and two[k].abs().max() == 0), (s, r, k)
    assert rec[1, 0, 0]["sampled"].tolist() == [True, True, False, True]

    # step 0 against each expert trained alone on its own samples, float64
    bt = D.build_teacher(spec)
    ref = ExpertBank(bt.model, bt.placement(r=2, alpha=2.0, layout=None), 4, 1000, arch=bt.arch).double().train()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(rec[1, 0, 0]["param/" + k])
    x, t, target = batches[0]
    e = ref.expert_index(t)
    for ex in range(4):
        rows = (e == ex).nonzero().flatten()
        if rows.numel():
            F.mse_loss(ref(x[rows].double(), t[rows]), target[rows].double()).backward()
    g_sep = {k: p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in ref.named_parameters() if p.requires_grad}
    g_one = {k: rec[1, 0, 0]["grad/" + k] for k in g_sep}
    _per_expert_close(g_one, g_sep, 4, {0, 1, 3}, 1e-5)


def test_distill_ppap_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """A kill after step 3 (state written at step 2) and a restart give bitwise the experts, optimizer
    trajectory and losses of one uninterrupted run; a restart with another setting is refused."""
    from ppap_fast import distributed as D
    from ppap_fast.distill import distill_ppap

    teacher, _, data = _datafree_set(tmp_path)
    kw = dict(n_experts=5, r=2, alpha=2.0, steps=5, batch_size=2, lr=1e-2, progress=False)
    ref = distill_ppap(teacher, data, **kw)
    state = tmp_path / "state.safetensors"
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(D.SimulatedCrash):
        distill_ppap(teacher, data, checkpoint_path=state, checkpoint_every=2, **kw)
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    assert D.read_train_state_meta(state)["step"] == "2"
    with pytest.raises(ValueError, match=r"differs in lr: 0\.01 there vs 0\.02 now") as e:
        distill_ppap(teacher, data, checkpoint_path=state, checkpoint_every=2, **{**kw, "lr": 2e-2})
    assert "\n" not in str(e.value)
    assert D.read_train_state_meta(state)["step"] == "2"  # the refused run left the state alone
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    older = tmp_path / "older_state.safetensors"  # as written before per-expert losses were kept
    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in load_file(str(state)).items() if k != D.EXPERT_LOSSES}, str(older), metadata=meta)
    from_older = distill_ppap(teacher, data, checkpoint_path=older, checkpoint_every=2, **kw)
    out = distill_ppap(teacher, data, checkpoint_path=state, checkpoint_every=2, **kw)
    assert (out.resumed_from_step, out.trained_steps, ref.trained_steps) == (2, 5, 5)
    assert D.read_train_state_meta(state)["step"] == "5"  # written on completion too
    a, b = ref.state_dict(), out.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out.train_losses == ref.train_losses and len(ref.train_losses) == 5
    per = torch.tensor(ref.train_expert_losses, dtype=torch.float64)  # [steps, N], NaN: no sample that step
    assert per.shape == (5, 5) and torch.equal(torch.tensor(out.train_expert_losses).nan_to_num(-1), per.nan_to_num(-1))
    seen = per.isfinite().sum(1)
    assert ((seen >= 1) & (seen <= 2)).all(), per  # 2 samples a step: one or two experts
    mean = torch.tensor(ref.train_losses, dtype=torch.float64)
    lo, hi = per.nan_to_num(float("inf")).min(1).values, per.nan_to_num(-float("inf")).max(1).values
    assert ((mean >= lo - 1e-6) & (mean <= hi + 1e-6)).all() and (lo > 0).all(), (mean, per)
    older_rows = torch.tensor(from_older.train_expert_losses, dtype=torch.float64)  # steps 1-2 unknown there: NaN
    assert from_older.train_losses == ref.train_losses and older_rows[:2].isnan().all()
    assert torch.equal(older_rows[2:].nan_to_num(-1), per[2:].nan_to_num(-1))
    again = distill_ppap(teacher, data, checkpoint_path=state, checkpoint_every=2, **kw)  # nothing left to train
    assert again.resumed_from_step == 5 and all(torch.equal(a[k], again.state_dict()[k]) for k in a)
