"""Supervised noise-aware fine-tuning (finetune.py): one-pass training of N experts equals
training each expert separately on its own samples, and a killed run resumes exactly."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _util import assert_removes_only_its_own_temporaries
from ppap_fast.finetune import MultiExperts, _cosine_lr, accuracy, finetune_noise_aware, noisy_batch, train_classifier
from ppap_fast.schedule import Schedule

N_EXPERTS, STEPS, BATCH, LR, WD = 4, 8, 5, 2e-2, 0.1


def _tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(32, 10))


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _separately_trained(base, x, y):
    """Each expert alone: its own copy and AdamW, a step only in the batches that hold its samples,
    the mean cross-entropy over those (the batches and lr of the one-pass run)."""
    gen = torch.Generator().manual_seed(0)
    sched = Schedule.create("linear", 1000)
    experts = [copy.deepcopy(base).train() for _ in range(N_EXPERTS)]
    opts = [torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD) for m in experts]
    skipped_after_a_step = 0  # steps where an expert that has AdamW moments gets no sample
    for step in range(STEPS):
        xt, yb, t = noisy_batch(x, y, BATCH, 1, gen, sched)
        e = t // (1000 // N_EXPERTS)
        for n, (m, opt) in enumerate(zip(experts, opts)):
            rows = (e == n).nonzero().flatten()
            if rows.numel() == 0:
                skipped_after_a_step += bool(opt.state)
                continue
            _cosine_lr(opt, LR, step, STEPS)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(xt[rows]), yb[rows]).backward()
            opt.step()
    assert skipped_after_a_step > 0  # else the test could not see an unsampled expert being moved
    return experts


def _max_diff(me, experts):
    # torch's max: a NaN anywhere gives NaN (Python's max() kept the first value and dropped later NaNs)
    return float(torch.stack([(a.double() - b.double()).abs().max()
                              for n, m in enumerate(experts)
                              for a, b in zip(me.experts[n].state_dict().values(), m.state_dict().values())]).max())


def test_one_pass_finetune_equals_training_each_expert_separately():
    base, (x, y) = _tiny_classifier(), _data()
    ref = _separately_trained(base, x, y)
    kw = dict(n_experts=N_EXPERTS, steps=STEPS, batch_size=BATCH, lr=LR, weight_decay=WD, progress=False)
    one_pass = finetune_noise_aware(base, x, y, **kw)
    assert one_pass.trained_steps == STEPS and len(one_pass.train_losses) == STEPS
    assert _max_diff(one_pass, [m.eval() for m in ref]) < 1e-6  # parameters and BatchNorm statistics
    # the batch mean weights expert e by n_e / B, which varies from step to step
    batch_mean = finetune_noise_aware(base, x, y, loss_reduction="batch_mean", **kw)
    assert _max_diff(batch_mean, ref) > 1e-4
    with pytest.raises(ValueError, match="unknown loss reduction 'sum'"):
        finetune_noise_aware(base, x, y, loss_reduction="sum", **kw)


def test_batch_mean_reproduces_the_plain_loop_of_the_shipped_baselines_bitwise():
    """docs/demo.md regenerates noise_aware / multi5 with --loss-reduction batch_mean: the loop they were
    trained with (batch-mean cross-entropy, plain AdamW step, these draws in this order)."""
    from ppap_fast.data import random_shift

    base, (x, y) = _tiny_classifier(), _data()
    torch.manual_seed(0)
    gen, sched = torch.Generator().manual_seed(0), Schedule.create("linear", 1000)
    me = MultiExperts(base, N_EXPERTS).train()
    opt = torch.optim.AdamW(me.parameters(), lr=LR, weight_decay=WD)
    for step in range(STEPS):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        x0 = random_shift(x[idx], 1, generator=gen)
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
        _cosine_lr(opt, LR, step, STEPS)
        loss = F.cross_entropy(me(xt, t), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = finetune_noise_aware(base, x, y, N_EXPERTS, STEPS, BATCH, LR, WD, progress=False,
                               loss_reduction="batch_mean")
    a, b = me.state_dict(), out.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_sampled_experts_leaves_unsampled_experts_and_their_adamw_state_alone():
    torch.manual_seed(0)
    me = MultiExperts(nn.Linear(3, 2), 2, 10)
    opt = torch.optim.AdamW(me.parameters(), lr=0.1, weight_decay=0.5)
    x, t = torch.randn(4, 3), torch.tensor([1, 2, 6, 7])
    me(x, t).square().sum().backward()
    me.step_sampled_experts(opt, me.sampled_experts(t))  # both experts get moments
    before = copy.deepcopy((me.state_dict(), opt.state_dict()))
    opt.zero_grad(set_to_none=False)  # zero, not None: a plain step would decay expert 1 and its moments
    t = torch.tensor([0, 3, 4, 2])
    me(x, t).square().sum().backward()
    sampled = me.sampled_experts(t)
    assert sampled.tolist() == [True, False]
    me.step_sampled_experts(opt, sampled)
    after = (me.state_dict(), opt.state_dict())
    assert all(torch.isfinite(v).all() for v in after[0].values())  # a NaN step is "not equal" too
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]) == k.startswith("experts.1."), k
    for i in (2, 3):  # expert 1's weight and bias: moments and step count unchanged
        for field, v in before[1]["state"][i].items():
            assert torch.equal(v, after[1]["state"][i][field]), field
    moved = after[1]["state"][0]["exp_avg"]
    assert torch.isfinite(moved).all() and not torch.equal(before[1]["state"][0]["exp_avg"], moved)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2,\)"):
        me.step_sampled_experts(opt, torch.tensor([1, 0]))


def test_finetune_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """A kill after step 3 (state written at step 2) and a restart give bitwise the experts, BatchNorm
    statistics and losses of one uninterrupted run; restarts with other settings are refused."""
    from ppap_fast import distributed as D

    base, (x, y) = _tiny_classifier(), _data()
    kw = dict(n_experts=N_EXPERTS, steps=5, batch_size=BATCH, lr=LR, weight_decay=WD, progress=False)
    ref = finetune_noise_aware(base, x, y, **kw)
    state = tmp_path / "m.finetune_state.safetensors"
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(D.SimulatedCrash):
        finetune_noise_aware(base, x, y, checkpoint_path=state, checkpoint_every=2, **kw)
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    assert D.read_train_state_meta(state)["step"] == "2"
    for change, msg in [({"lr": 1e-2}, r"lr: 0\.02 there vs 0\.01 now"),
                        ({"loss_reduction": "batch_mean"}, "loss_reduction: 'expert_mean' there vs 'batch_mean' now"),
                        ({"max_minutes": 5.0}, "max_minutes: None there vs 5.0 now")]:
        with pytest.raises(ValueError, match=msg) as e:
            finetune_noise_aware(base, x, y, checkpoint_path=state, checkpoint_every=2, **{**kw, **change})
        assert "another configuration" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="differs in data"):  # other labels
        finetune_noise_aware(base, x, (y + 1) % 10, checkpoint_path=state, checkpoint_every=2, **kw)
    assert D.read_train_state_meta(state)["step"] == "2"  # the refused runs left the state alone
    out = finetune_noise_aware(base, x, y, checkpoint_path=state, checkpoint_every=2, **kw)
    assert (out.resumed_from_step, out.trained_steps, ref.trained_steps) == (2, 5, 5)
    assert D.read_train_state_meta(state)["step"] == "5"  # written on completion too
    a, b = ref.state_dict(), out.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out.train_losses == ref.train_losses and len(ref.train_losses) == 5
    again = finetune_noise_aware(base, x, y, checkpoint_path=state, checkpoint_every=2, **kw)  # nothing to train
    assert again.resumed_from_step == 5 and all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        finetune_noise_aware(base, x, y, checkpoint_path=state, checkpoint_every=0, **kw)


def test_finetune_learning_rate_follows_the_step(monkeypatch):
    """int(step / steps * steps) is step - 1 for some steps (29 of 100): they took the previous step's LR."""
    from ppap_fast import finetune

    seen = []
    real = finetune._cosine_lr
    monkeypatch.setattr(finetune, "_cosine_lr",
                        lambda opt, lr, step, total: (seen.append(step), real(opt, lr, step, total)))
    base, (x, y) = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), _data(4)
    me = finetune_noise_aware(base, x, y, n_experts=1, steps=100, batch_size=2, progress=False)
    assert seen == list(range(100)) and me.trained_steps == 100
    assert all(math.isfinite(v) for v in me.train_losses)


def test_a_resumable_state_removes_only_its_own_killed_writes(tmp_path):
    """Every .<state>.*.tmp was removed, a user's file of that shape too: only _atomic's exact names go."""
    state = "m.finetune_state.safetensors"
    base, (x, y) = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), _data(4)
    me = assert_removes_only_its_own_temporaries(
        tmp_path, state, ".safetensors", ".json",
        lambda: finetune_noise_aware(base, x, y, n_experts=1, steps=1, batch_size=2, progress=False,
                                     checkpoint_path=tmp_path / state))
    assert me.trained_steps == 1 and (tmp_path / state).is_file()


def test_accuracy_and_router_refuse_misshaped_labels_and_timesteps():
    # y of shape (N, 1) or (1,) broadcast against the predictions into a wrong accuracy, an empty x gave NaN;
    # a t shorter than the batch left the rows without one as zeros; an empty batch returned None
    base = _tiny_classifier()
    x, _ = _data(6)
    y = base.eval()(x).argmax(1)
    assert accuracy(base, x, y) == 1.0
    for bad in (y[:, None], y[:1]):
        with pytest.raises(ValueError, match=r"y must have shape \(6,\)"):
            accuracy(base, x, bad)
    with pytest.raises(ValueError, match="no images"):
        accuracy(base, x[:0], y[:0])
    base.train()  # scored in eval mode, then left in it: a training loop calling accuracy went on in eval mode
    assert accuracy(base, x, y) == 1.0 and base.training
    me = MultiExperts(base, 2, 10).eval()
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(6,\)"):
        me(x, torch.tensor([0, 9]))
    assert me(x[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 10)
    with pytest.raises(ValueError, match="t must hold integer"):  # as ExpertBank (4.9 was truncated to 4)
        me(x, torch.full((6,), 4.9))
    assert me.sampled_experts(torch.tensor([0, 1, 2])).tolist() == [True, False]
    import numpy as np
    assert type(MultiExperts(base, np.int64(2), 10).n_experts) is int  # was refused as 'not a positive int'
    with pytest.raises(ValueError, match="n_experts must be a positive int"):
        MultiExperts(base, True, 10)


def test_training_refuses_mismatched_or_nonfinite_data():
    # y shorter than x failed mid-training with an IndexError (longer: silently misaligned); NaN images
    # trained every expert to NaN without an error
    x, y = _data(6)
    for train in (lambda x, y: train_classifier(_tiny_classifier(), x, y, steps=1, batch_size=2, progress=False),
                  lambda x, y: finetune_noise_aware(_tiny_classifier(), x, y, steps=1, batch_size=2, progress=False)):
        with pytest.raises(ValueError, match=r"y must hold one label per image of x \(6\)"):
            train(x, y[:3])
        with pytest.raises(ValueError, match="x holds 1 non-finite"):
            train(torch.where(torch.arange(x.numel()).view_as(x) == 5, float("nan"), x), y)
        with pytest.raises(ValueError, match="x must be a non-empty floating tensor"):
            train((x * 100).to(torch.uint8), y)
    for kw in ({"steps": 0}, {"batch_size": 0}, {"steps": 2.5}):  # ran without training, or failed in range()
        with pytest.raises(ValueError, match="steps and batch_size must be positive ints"):
            train_classifier(_tiny_classifier(), x, y, progress=False, **{"steps": 1, "batch_size": 2, **kw})
    import numpy as np
    train_classifier(_tiny_classifier(), x, y, steps=np.int64(1), batch_size=np.int32(2), progress=False)


def test_a_noise_aware_experts_file_is_named_by_the_tiny_model_loader(tmp_path):
    """load_model (tiny:<file> teachers and classifiers) said finetune's experts file had 'no model metadata'."""
    from ppap_fast.finetune import load_multi, save_multi
    from ppap_fast.models.tiny import TinyResNet, load_model

    path = save_multi(MultiExperts(TinyResNet(widths=(4,), num_classes=3), 2), tmp_path / "experts.safetensors")
    assert load_multi(path).n_experts == 2
    for kind in (None, "resnet"):
        with pytest.raises(ValueError, match=r"holds a 'multiexperts' file \(finetune's noise-aware experts"):
            load_model(path, kind)


def test_load_multi_names_the_keys_that_do_not_fit(tmp_path):
    """A file whose tensors do not fit its metadata said only "Error(s) in loading state_dict for MultiExperts:"."""
    import json

    from ppap_fast.data.shards import save_safetensors_atomic
    from ppap_fast.finetune import load_multi
    from ppap_fast.models.tiny import TinyResNet

    base = TinyResNet(widths=(4,), num_classes=3)
    meta = {"kind": "multiexperts", "n_experts": "2", "num_timesteps": "1000", "base_kind": "resnet",
            "base_config": json.dumps(base.config)}
    path = save_safetensors_atomic(tmp_path / "e.safetensors", MultiExperts(base, 4).state_dict(), metadata=meta)
    with pytest.raises(ValueError, match=r"e\.safetensors does not match its model \(2 x resnet .*\): Unexpected "
                                         r"key\(s\) in state_dict: \"experts\.2\."):
        load_multi(path)


def test_hand_edited_tiny_model_metadata_is_refused_in_one_line_naming_the_file(tmp_path):
    """A config that was a JSON list / string gave a TypeError from MODEL_KINDS[k](**config); a bad 'extra'
    a JSONDecodeError; neither named the file."""
    import json

    from ppap_fast.data.shards import save_safetensors_atomic
    from ppap_fast.models.tiny import TinyResNet, load_model

    base = TinyResNet(widths=(4,), num_classes=3)
    good = {"kind": "resnet", "config": json.dumps(base.config), "extra": "{}"}
    cases = {
        "config list": ({"config": "[4]"}, r"metadata 'config' must be a JSON object, got a JSON list"),
        "config string": ({"config": '"resnet"'}, r"metadata 'config' must be a JSON object, got a JSON str"),
        "config not JSON": ({"config": "{widths"}, r"metadata 'config' is not valid JSON"),
        "config bad key": ({"config": '{"width": 4}'}, r"its 'resnet' config \{'width': 4\} does not build the model"),
        "negative size": ({"config": '{"widths": [4], "num_classes": -1}'},
                          r"does not build the model \(Trying to create tensor with negative dimension"),
        "extra list": ({"extra": "[1]"}, r"metadata 'extra' must be a JSON object, got a JSON list"),
        "extra not JSON": ({"extra": "{"}, r"metadata 'extra' is not valid JSON"),
    }
    for i, (edit, msg) in enumerate(cases.values()):
        path = save_safetensors_atomic(tmp_path / f"m{i}.safetensors", base.state_dict(), metadata={**good, **edit})
        with pytest.raises(ValueError, match=rf"^weight file .*m{i}\.safetensors(:| ).*{msg}") as err:
            load_model(path)
        assert "\n" not in str(err.value)
    path = save_safetensors_atomic(tmp_path / "ok.safetensors", base.state_dict(), metadata=good)
    assert load_model(path).extra == {}


def test_hand_edited_noise_aware_experts_metadata_is_refused_in_one_line_naming_the_file(tmp_path):
    """load_multi read base_kind / base_config / n_experts / extra unguarded: KeyError / JSONDecodeError /
    int() errors naming no file."""
    import json

    from ppap_fast.data.shards import save_safetensors_atomic
    from ppap_fast.finetune import load_multi
    from ppap_fast.models.tiny import TinyResNet

    base = TinyResNet(widths=(4,), num_classes=3)
    sd = MultiExperts(base, 2, 10).state_dict()
    good = {"kind": "multiexperts", "n_experts": "2", "num_timesteps": "10", "base_kind": "resnet",
            "base_config": json.dumps(base.config), "extra": "{}"}
    cases = [
        ({"base_kind": None}, r"has no 'base_kind' in its metadata"),
        ({"base_kind": "vgg"}, r"names model kind 'vgg', not one of the tiny models"),
        ({"base_config": None}, r"has no 'base_config' in its metadata"),
        ({"base_config": "{"}, r"metadata 'base_config' is not valid JSON"),
        ({"base_config": "[4]"}, r"metadata 'base_config' must be a JSON object, got a JSON list"),
        ({"n_experts": None}, r"has no 'n_experts' in its metadata"),
        ({"n_experts": "two"}, r"metadata 'n_experts' must be an integer, got 'two'"),
        ({"num_timesteps": "1e3"}, r"metadata 'num_timesteps' must be an integer, got '1e3'"),
        ({"n_experts": "3"}, r"its metadata does not build the experts: n_experts=3 must divide num_timesteps=10"),
        ({"extra": "{"}, r"metadata 'extra' is not valid JSON"),
        ({"extra": '"x"'}, r"metadata 'extra' must be a JSON object, got a JSON str"),
    ]
    for i, (edit, msg) in enumerate(cases):
        meta = {k: v for k, v in {**good, **edit}.items() if v is not None}
        path = save_safetensors_atomic(tmp_path / f"e{i}.safetensors", sd, metadata=meta)
        with pytest.raises(ValueError, match=rf"^weight file .*e{i}\.safetensors(:| ).*{msg}") as err:
            load_multi(path)
        assert "\n" not in str(err.value)
    path = save_safetensors_atomic(tmp_path / "ok.safetensors", sd, metadata=good)
    me = load_multi(path)
    assert (me.n_experts, me.num_timesteps, me.extra) == (2, 10, {})


def test_training_a_frozen_model_names_requires_grad():
    """build_guide_model / build_teacher freeze their models: training one failed in backward with
    "element 0 of tensors does not require grad"."""
    from ppap_fast.models.tiny import TinyResNet

    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    frozen = TinyResNet(widths=(4,), num_classes=3).requires_grad_(False)
    with pytest.raises(ValueError, match=r"train_classifier: the model has no parameter with requires_grad=True"):
        train_classifier(frozen, x, y, steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"finetune_noise_aware: the base model has no parameter .*requires_grad_"):
        finetune_noise_aware(frozen, x, y, steps=1, batch_size=2, progress=False)
    frozen.fc.requires_grad_(True)  # a partly frozen model (linear probe) trains
    train_classifier(frozen, x, y, steps=1, batch_size=2, progress=False)


def test_float64_finetune_trains_in_float64_and_resumes_bitwise(tmp_path, monkeypatch):
    """A float64 model was fed float32 batches (a dtype error in its first conv). It trains in float64, and a
    kill after step 3 (state at step 2) then a restart give bitwise the uninterrupted run (Dropout's draws too)."""
    from ppap_fast import distributed as D

    base = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.3),
                         nn.AvgPool2d(4), nn.Flatten(), nn.Linear(32, 10)).double()
    x, y = _data()
    kw = dict(n_experts=2, steps=5, batch_size=BATCH, lr=LR, weight_decay=WD, progress=False)
    ref = finetune_noise_aware(base, x.double(), y, **kw)
    assert all(v.dtype == torch.float64 for v in ref.parameters()) and ref.trained_steps == 5
    assert all(math.isfinite(v) for v in ref.train_losses)
    assert not torch.equal(ref.experts[0][0].weight, ref.experts[1][0].weight)  # the experts trained apart
    state = tmp_path / "m.finetune_state.safetensors"
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(D.SimulatedCrash):
        finetune_noise_aware(base, x.double(), y, checkpoint_path=state, checkpoint_every=2, **kw)
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    out = finetune_noise_aware(base, x.double(), y, checkpoint_path=state, checkpoint_every=2, **kw)
    assert out.resumed_from_step == 2
    a, b = ref.state_dict(), out.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out.train_losses == ref.train_losses


@pytest.mark.parametrize("bad", [dict(steps=2.5), dict(batch_size=True), dict(n_experts=0), dict(max_minutes=0.0)])
def test_finetune_refuses_counts_that_are_not_positive_ints(bad):
    """steps=2.5 was a TypeError from range() that named no argument; batch_size=True trained on batches of one."""
    base, (x, y) = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), _data(4)
    kw = {"n_experts": 1, "steps": 2, "batch_size": 2, "progress": False, "max_minutes": None, **bad}
    with pytest.raises(ValueError, match=r"^n_experts, steps and batch_size must be positive ints, max_minutes positive "
                                         r"or None; got n_experts=\d+, steps=[\d.]+, batch_size=\w+, max_minutes=\S+$"):
        finetune_noise_aware(base, x, y, **kw)


def test_fixed_lr_warmup_is_documented_where_lr_is_given():
    """The warmup is a fixed 50 steps, so a run of fewer steps never reaches its LR; nothing said so."""
    import argparse

    from ppap_fast import cli, finetune

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = []
    for step in range(finetune.LR_WARMUP_STEPS):
        _cosine_lr(opt, 1.0, step, 40)
        lrs.append(opt.param_groups[0]["lr"])
    assert all(math.isfinite(v) for v in lrs) and max(lrs) < 0.5  # a 40-step run peaks far below its LR
    said = "linear warmup over the first 50 steps (fixed"
    assert finetune.LR_WARMUP_STEPS == 50
    for fn in (train_classifier, finetune_noise_aware):
        assert said in " ".join(fn.__doc__.split()), fn.__name__
    subs = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for cmd in ("train-classifier", "finetune"):
        lr = next(a for a in subs[cmd]._actions if "--lr" in a.option_strings)
        assert "linear warmup over the first 50 steps (fixed: with --steps under 50 it is never reached)" in lr.help


def test_distill_lr_help_names_the_linear_decay_distill_ppap_applies():
    """distill_ppap anneals its LR linearly (1 - frac); the distill --lr help said "cosine" (finetune's shape)."""
    import argparse

    from ppap_fast import cli

    subs = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    lr = next(a for a in subs["distill"]._actions if "--lr" in a.option_strings)
    assert "then a linear decay to 0" in lr.help and "cosine" not in lr.help, lr.help
