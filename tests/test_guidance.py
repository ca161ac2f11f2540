"""Guides: gradients vs finite differences (float64), golden cond_fn grad, routing, bad input, NaN."""
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppap_fast import fast_sampling as fs
from ppap_fast.experts import ExpertBank
from ppap_fast.guidance import (ClassGuide, ComposedGuide, DenseRegressionGuide, SegmentationGuide, X0HatGuide,
                                as_cond_fn, input_transform)

from _util import rel

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def numerical_grad(J, x, h=1e-6):
    """Central differences of the scalar J at every element of x (float64)."""
    g = torch.empty_like(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        g.view(-1)[i] = (J((flat + e).view_as(x)) - J((flat - e).view_as(x))) / (2 * h)
    return g


class SmallNet(nn.Module):
    def __init__(self, k=5, num_classes_attr=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, k)
        if num_classes_attr:
            self.num_classes = k

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


def small_bank():
    bank = ExpertBank(SmallNet().to(D), "generic", n_experts=5).eval()
    with torch.no_grad():
        for name, p in bank.per_expert_state_dict().items():
            if name.endswith(("running_mean", "lora_A", "lora_B", "bias")):
                p.normal_(0, 0.3)
    return bank


# ----------------------------------------------------------------------------- ClassGuide
def test_class_guide_gradcheck_plain_model():
    model = SmallNet().to(D).eval()
    target = torch.tensor([1, 4])
    guide = ClassGuide(model, target, scale=2.5)
    x = torch.randn(2, 2, 3, 3, dtype=D)
    g = guide(x, torch.tensor([10, 900]))
    assert g.shape == x.shape and g.dtype == D and not g.requires_grad

    def J(z):
        return 2.5 * F.log_softmax(model(z), -1).gather(1, target.view(-1, 1)).sum()

    assert rel(g, numerical_grad(J, x)) < 1e-7
    # plain classifier ignores t (the naive baseline)
    assert torch.equal(g, guide(x, torch.tensor([999, 0])))
    assert all(p.grad is None for p in model.parameters())
    # int target == per-sample tensor target
    assert torch.equal(ClassGuide(model, 3)(x, 5), ClassGuide(model, torch.tensor([3, 3]))(x, 5))


def test_class_guides_refuse_a_single_logit():
    """A one-logit classifier [B, 1] gave log_softmax == 0: ClassGuide / X0HatGuide returned all-zero guidance.
    The two-class logits [0, l] the error names give log sigmoid(l) for class 1."""
    lin = nn.Linear(18, 1).to(D)
    x = torch.randn(2, 2, 3, 3, dtype=D)

    def one_logit(z):
        return lin(z.flatten(1))

    den, acp = ToyDenoiser(), torch.linspace(0.99, 0.1, 100, dtype=D)
    for guide in (ClassGuide(one_logit, 0), X0HatGuide(one_logit, den, acp, 0)):
        with pytest.raises(ValueError, match=r"logits \(2, 1\) have one class.*torch.cat\(\[torch.zeros_like\(l\), l\], 1\)"):
            guide(x, 5)
    g = ClassGuide(lambda z: torch.cat([torch.zeros_like(one_logit(z)), one_logit(z)], 1), 1, scale=2.0)(x, 5)
    want = numerical_grad(lambda z: 2.0 * F.logsigmoid(one_logit(z)).sum(), x)
    assert torch.isfinite(g).all() and rel(g, want) < 1e-7


def test_targets_are_checked_against_the_logits_class_count_not_only_num_classes():
    """num_classes= larger than the network's K passed the construction check and was never compared with the logits:
    a target in [K, num_classes) failed inside gather / cross_entropy (a device-side assert on CUDA)."""
    x = torch.randn(2, 2, 3, 3, dtype=D)
    clf = SmallNet(k=5, num_classes_attr=False).to(D).eval()
    with pytest.raises(ValueError, match=r"^ClassGuide: target class 7 is out of range for a model with 5 classes$"):
        ClassGuide(clf, 7, num_classes=10)(x, 3)
    after_override = ClassGuide(clf, 7, num_classes=10)
    assert torch.isfinite(after_override(x, 3, target=1)).all()  # a per-call target in range: its own check
    with pytest.raises(ValueError, match=r"^ClassGuide: target class 7 is out of range for a model with 5 classes$"):
        after_override(x, 3)
    with pytest.raises(ValueError, match=r"^SegmentationGuide: label 6 is out of range for a model with 4 classes$"):
        SegmentationGuide(DenseNet(4), torch.full((2, 3, 3), 6), num_classes=8)(x, 3)
    g = ClassGuide(clf, 4, num_classes=10, scale=2.0)(x, 3)  # in range of both: as before
    want = numerical_grad(lambda z: 2.0 * F.log_softmax(clf(z), -1)[:, 4].sum(), x)
    assert torch.isfinite(g).all() and rel(g, want) < 1e-7


def test_a_network_that_detaches_its_input_is_refused():
    """A guide network detaching x (or running it through NumPy): with trainable parameters the gradient was
    silently all zeros (allow_unused), with frozen ones autograd's 'element 0 of tensors does not require grad'."""
    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(18, 5).to(D)

        def forward(self, z):
            return self.fc(z.detach().flatten(1))

    x = torch.randn(2, 2, 3, 3, dtype=D)
    for net in (Detaching(), Detaching().requires_grad_(False)):
        for guide in (ClassGuide(net, 1), fs.FastGuide(ClassGuide(net, 1), None).runner(None)):
            with pytest.raises(ValueError, match=r"^ClassGuide: the guidance objective does not depend on x_t through "
                                                 r"autograd .*keep the path from its input to its output differentiable$"):
                guide(x, 3)


def test_class_guide_matches_guided_diffusion_cond_fn(fixtures_dir):
    gold = torch.load(fixtures_dir / "guided_steps_golden.pt")
    W = gold["W"]

    def clf(x):
        return x.flatten(1) @ W.T

    guide = ClassGuide(clf, gold["y"], scale=gold["scale"])
    g = guide(gold["x_T"], torch.tensor([999, 999]))
    assert rel(g, gold["grad_at_xT"]) < 1e-5
    cond_fn = as_cond_fn(ClassGuide(clf, 0, scale=gold["scale"]))
    assert rel(cond_fn(gold["x_T"], torch.tensor([960, 960]), y=gold["y"]), gold["grad_at_xT"]) < 1e-5


def test_class_guide_with_bank_routes_each_sample():
    bank = small_bank()
    guide = ClassGuide(bank, torch.tensor([0, 2, 4]), scale=1.5)
    assert guide.pass_t
    x = torch.randn(3, 2, 4, 4, dtype=D)
    t = torch.tensor([999, 0, 200])
    g = guide(x, t)
    for i in range(3):
        gi = ClassGuide(bank, int(guide.target.target[i]), scale=1.5)(x[i:i + 1], t[i:i + 1])
        assert rel(g[i:i + 1], gi) < 1e-12

    def J(z):
        return 1.5 * F.log_softmax(bank(z, t), -1).gather(1, torch.tensor([[0], [2], [4]])).sum()

    assert rel(g, numerical_grad(J, x)) < 1e-7
    # the expert matters
    assert rel(guide(x, torch.tensor([0, 0, 0])), g) > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        guide(x, torch.tensor([0, 0, 1000]))
    assert all(p.grad is None for p in bank.parameters())


def test_class_guide_target_validation():
    model = SmallNet(k=5).to(D)
    with pytest.raises(ValueError, match="out of range"):
        ClassGuide(model, 5)  # num_classes known from the model
    with pytest.raises(ValueError, match="out of range"):
        ClassGuide(model, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="negative"):
        ClassGuide(model, -1)
    with pytest.raises(ValueError, match="integer"):
        ClassGuide(model, torch.tensor([0.0, 1.0]))
    anon = SmallNet(k=5, num_classes_attr=False).to(D)
    g = ClassGuide(anon, 6)  # unknown class count: checked at the first call
    with pytest.raises(ValueError, match="out of range for a model with 5 classes"):
        g(torch.randn(1, 2, 3, 3, dtype=D), 3)
    with pytest.raises(ValueError, match="batch"):
        ClassGuide(model, torch.tensor([0, 1, 2]))(torch.randn(2, 2, 3, 3, dtype=D), 3)
    import numpy as np  # numpy class ids (a scalar from a dataset, an array of them) as their torch equals

    x, model = torch.randn(2, 2, 3, 3, dtype=D), model.eval()
    assert torch.equal(ClassGuide(model, np.int64(3))(x, 3), ClassGuide(model, 3)(x, 3))
    assert torch.equal(ClassGuide(model, np.array([3, 1]))(x, 3), ClassGuide(model, torch.tensor([3, 1]))(x, 3))
    with pytest.raises(ValueError, match="out of range"):
        ClassGuide(model, np.array([0, 7]))
    with pytest.raises(ValueError, match="integer tensor / array"):
        ClassGuide(model, np.array([0.5]))


def test_bad_inputs():
    model = SmallNet().to(D)
    guide = ClassGuide(model, 1)
    x = torch.randn(2, 2, 3, 3, dtype=D)
    with pytest.raises(ValueError, match="floating"):
        guide(x.long(), 3)
    with pytest.raises(ValueError, match="integer"):
        guide(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        guide(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="scale"):
        ClassGuide(model, 1, scale=float("nan"))
    with pytest.raises(ValueError, match="nonfinite"):
        ClassGuide(model, 1, nonfinite="warn")
    # a per-sample scale of another length: a raw broadcasting RuntimeError before
    with pytest.raises(ValueError, match="scale has 3 per-sample values for a batch of 2"):
        ClassGuide(model, 1, scale=torch.tensor([1.0, 2.0, 3.0]))(x, 3)
    with pytest.raises(ValueError, match="weight has 3 per-sample values for a batch of 2"):  # a raw broadcast error
        ComposedGuide([(ClassGuide(model, 1), torch.tensor([1.0, 2.0, 3.0]))])(x, 3)
    model.eval()
    per_sample = ClassGuide(model, 1, scale=torch.tensor([2.0, 0.0], dtype=D))(x, 3)
    assert rel(per_sample[0], ClassGuide(model, 1, scale=2.0)(x, 3)[0]) < 1e-14 and not per_sample[1].any()


# ----------------------------------------------------------------------------- non-finite
class NaNAt(nn.Module):
    """Linear classifier that turns sample 1's logits to NaN."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(18, 3).to(D)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        mask = torch.zeros_like(y)
        mask[1] = float("nan")
        return y + mask


def test_nonfinite_raise_and_zero():
    x = torch.randn(3, 2, 3, 3, dtype=D)
    with pytest.raises(RuntimeError, match="ClassGuide.*NaN"):
        ClassGuide(NaNAt(), 1)(x, 5)
    m = NaNAt()
    g = ClassGuide(m, 1, nonfinite="zero")(x, 5)
    assert torch.isfinite(g).all() and g[1].abs().sum() == 0 and g[0].abs().sum() > 0
    ref = ClassGuide(m, 1, nonfinite="ignore")(x, 5)
    assert torch.isnan(ref[1]).all() and torch.equal(ref[0], g[0])
    comp = ComposedGuide([(ClassGuide(m, 1, nonfinite="ignore"), 1.0)])
    with pytest.raises(RuntimeError, match="ComposedGuide"):
        comp(x, 5)


# ----------------------------------------------------------------------------- x0-hat
class ToyDenoiser(nn.Module):
    def __init__(self, out_mult=1):
        super().__init__()
        self.conv = nn.Conv2d(2, 2 * out_mult, 3, padding=1).to(D)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / 1000)


@pytest.mark.parametrize("through", [True, False])
@pytest.mark.parametrize("out_mult", [1, 2])
def test_x0hat_guide(through, out_mult):
    clf = SmallNet().to(D).eval()
    den = ToyDenoiser(out_mult)
    acp = torch.linspace(0.999, 0.01, 1000, dtype=D)
    t = torch.tensor([10, 700])
    target = torch.tensor([2, 0])
    guide = X0HatGuide(clf, den, acp, target, scale=2.0, through_denoiser=through)
    x = torch.randn(2, 2, 3, 3, dtype=D)
    g = guide(x, t)
    ab = acp[t].view(-1, 1, 1, 1)

    def x0(z, eps_of):
        return (z - (1 - ab).sqrt() * eps_of(z)) / ab.sqrt()

    def eps(z):
        return den(z, t)[:, :2]

    if through:
        def J(z):
            return 2.0 * F.log_softmax(clf(x0(z, eps)), -1).gather(1, target.view(-1, 1)).sum()
    else:
        e0 = eps(x).detach()

        def J(z):
            return 2.0 * F.log_softmax(clf(x0(z, lambda _: e0)), -1).gather(1, target.view(-1, 1)).sum()

    assert rel(g, numerical_grad(J, x)) < 1e-7
    assert all(p.grad is None for p in den.parameters())


def test_x0hat_guide_bad_inputs():
    clf, den = SmallNet().to(D), ToyDenoiser()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        X0HatGuide(clf, den, torch.tensor([0.5, 1.5]), 0)
    guide = X0HatGuide(clf, den, torch.linspace(0.99, 0.1, 100, dtype=D), 0)
    with pytest.raises(ValueError, match="out of range"):
        guide(torch.randn(1, 2, 3, 3, dtype=D), 100)
    bad = X0HatGuide(clf, ToyDenoiser(3), torch.linspace(0.99, 0.1, 100, dtype=D), 0)
    with pytest.raises(ValueError, match="denoiser output"):
        bad(torch.randn(1, 2, 3, 3, dtype=D), 5)


def test_x0hat_guide_takes_an_x_t_of_another_dtype_than_its_denoiser():
    """ClassGuide casts x_t to its network's dtype; X0HatGuide fed it to the denoiser as is (a float16 / float32
    x_t with a float32 / float64 denoiser: 'Input type and bias type should be the same')."""
    clf = SmallNet().to(D).eval()
    den, acp = ToyDenoiser(), torch.linspace(0.99, 0.1, 100, dtype=D)
    x, t = torch.randn(2, 2, 3, 3, dtype=D), torch.tensor([3, 80])
    for through in (True, False):
        guide = X0HatGuide(clf, den, acp, torch.tensor([1, 4]), scale=2.0, through_denoiser=through)
        for dt in (torch.float32, torch.float16):
            xl = x.to(dt)
            g = guide(xl, t)
            want = guide(xl.double(), t)
            assert g.dtype == dt and torch.isfinite(g).all() and rel(g.double(), want) < (1e-6 if dt == torch.float32 else 2e-3)


# ----------------------------------------------------------------------------- dense guides
class DenseNet(nn.Module):
    def __init__(self, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(2, out_ch, 3, padding=1).to(D)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_dense_regression_guide():
    net = DenseNet(1)
    target = torch.randn(2, 1, 3, 3, dtype=D)
    guide = DenseRegressionGuide(net, target, scale=4.0)
    x = torch.randn(2, 2, 3, 3, dtype=D)

    def J(z):
        return -4.0 * ((net(z) - target) ** 2).flatten(1).mean(1).sum()

    assert rel(guide(x, 3), numerical_grad(J, x)) < 1e-7
    shared = DenseRegressionGuide(net, target[0], scale=4.0)  # [1,3,3] target shared by the batch
    assert rel(shared(x[:1], 3), DenseRegressionGuide(net, target[:1], scale=4.0)(x[:1], 3)) < 1e-12
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 3\).*\(2, 2, 4, 4\)"):  # channels (an [H, W] is resized)
        DenseRegressionGuide(net, torch.zeros(2, 2, 4, 4, dtype=D))(x, 3)


def test_segmentation_guide():
    net = DenseNet(4)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0, 0] = 255
    labels[1, 2, :] = 255
    guide = SegmentationGuide(net, labels, scale=3.0, ignore_index=255)
    x = torch.randn(2, 2, 3, 3, dtype=D)

    def J(z):
        logp = F.log_softmax(net(z), 1)
        total = 0.0
        for b in range(2):
            valid = labels[b] != 255
            lab = labels[b].clamp(max=3)
            picked = logp[b].gather(0, lab.unsqueeze(0))[0]
            total = total + picked[valid].sum() / valid.sum()
        return 3.0 * total

    assert rel(guide(x, 0), numerical_grad(J, x)) < 1e-7
    with pytest.raises(ValueError, match="label 4 is out of range"):
        SegmentationGuide(net, torch.full((2, 3, 3), 4))(x, 0)
    with pytest.raises(ValueError, match="label 156 is out of range"):  # uint8 156 == -100 wrapped: unchecked
        SegmentationGuide(net, torch.full((2, 3, 3), 156, dtype=torch.uint8), num_classes=4)
    with pytest.raises(ValueError, match=r"logits shape \(2, 4, 3, 3\).*\(3, 5, 5\)"):  # batch ([H, W] is resized)
        SegmentationGuide(net, torch.zeros(3, 5, 5, dtype=torch.long))(x, 0)
    with pytest.raises(ValueError, match="integer"):
        SegmentationGuide(net, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="one class"):  # its gradient was silently all zeros
        SegmentationGuide(DenseNet(1), torch.zeros(2, 3, 3, dtype=torch.long))(x, 0)


def test_composed_guide():
    clf = SmallNet().to(D).eval()
    g1 = ClassGuide(clf, 1, scale=2.0)
    g2 = DenseRegressionGuide(DenseNet(1), torch.randn(2, 1, 3, 3, dtype=D), scale=0.5)
    x = torch.randn(2, 2, 3, 3, dtype=D)
    comp = ComposedGuide([(g1, 1.0), (g2, -3.0)])
    assert rel(comp(x, 4), g1(x, 4) - 3.0 * g2(x, 4)) < 1e-14
    with pytest.raises(ValueError, match="needs at least one guide"):
        ComposedGuide([])
    with pytest.raises(ValueError, match="scale"):
        ComposedGuide([(g1, float("inf"))])
    # a {guide: weight} mapping: iterating it gave the guides alone and silently dropped the weights
    assert rel(ComposedGuide({g1: 1.0, g2: -3.0})(x, 4), comp(x, 4)) < 1e-14
    with pytest.raises(ValueError, match=r"pass \[guide\]"):  # was "'ClassGuide' object is not iterable"
        ComposedGuide(g1)


# ----------------------------------------------------------------------------- input transform
def test_input_transform():
    tr = input_transform(size=5)
    x = torch.full((1, 3, 2, 2), -1.0, dtype=D)
    y = tr(x)
    assert y.shape == (1, 3, 5, 5)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=D)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=D)
    assert rel(y[0, :, 0, 0], -mean / std) < 1e-12
    xs = torch.randn(1, 3, 3, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(tr, (xs,))
    same = input_transform(mean=None, std=None)
    assert torch.equal(same(torch.zeros(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 0.5))
    with pytest.raises(ValueError, match="channel"):
        tr(torch.zeros(1, 1, 2, 2))
    # composes with a guide, differentiably
    clf = nn.Sequential(nn.Flatten(), nn.Linear(75, 3)).to(D)
    guide = ClassGuide(clf, 2, input_transform=tr)
    xx = torch.randn(1, 3, 2, 2, dtype=D)

    def J(z):
        return F.log_softmax(clf(tr(z)), -1)[0, 2]

    assert rel(guide(xx, 1), numerical_grad(J, xx)) < 1e-7


def test_composed_nonfinite_policy_applies_over_default_sub_guides():
    """ComposedGuide(nonfinite="zero") zeroes the bad sample; its sub-guides (left at "raise") must
    not raise before the composition's policy applies."""
    class Bad(nn.Module):  # sample 0: NaN logits, sample 1: fine
        def forward(self, x):
            return x.flatten(1)[:, :4] * torch.tensor([[float("nan")], [1.0]])

    out = ComposedGuide([ClassGuide(Bad(), 1), (ClassGuide(Bad(), 2), 0.5)], nonfinite="zero")(torch.randn(2, 3, 4, 4), 10)
    assert torch.isfinite(out).all() and not out[0].any() and out[1].abs().sum() > 0
    # a nested composition left at "raise" raised before the outer one's policy applied
    nested = ComposedGuide([ComposedGuide([ClassGuide(Bad(), 1)]), (ClassGuide(Bad(), 2), 0.5)], nonfinite="zero")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(nested(x, 10), ComposedGuide([ClassGuide(Bad(), 1), (ClassGuide(Bad(), 2), 0.5)],
                                                            nonfinite="zero")(x, 10))
    with pytest.raises(RuntimeError, match="holds NaN"):  # left at "raise" all the way: it raises
        ComposedGuide([ComposedGuide([ClassGuide(Bad(), 1)])])(x, 10)


def test_input_transform_follows_the_input_device_and_numpy_scales():
    import numpy as np

    assert input_transform(size=None)(torch.zeros(1, 3, 8, 8, device="meta")).device.type == "meta"
    for s in (np.float32(2.0), np.int64(3)):
        ClassGuide(nn.Linear(4, 3), 1, scale=s)
    for bad in (True, float("nan"), np.float32("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            ClassGuide(nn.Linear(4, 3), 1, scale=bad)


def test_input_transform_keeps_its_statistics_on_the_input_device(monkeypatch):
    """Buffers on another device than the input (a CPU transform guiding a CUDA model; "meta" here): the
    device copies of mean / std are made once, not at every call (a per-step host-to-device copy breaks
    CUDA-graph capture), and again after the buffers change in place or move."""
    tr = input_transform(size=None)
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (copies.append(a), real_to(t, *a, **k))[1])
    x = torch.zeros(2, 3, 4, 4, device="meta")
    for _ in range(3):
        assert tr(x).device.type == "meta"
    assert len(copies) == 2  # mean and std, once
    with torch.no_grad():
        tr.mean.mul_(1.0)
    tr(x)
    assert len(copies) == 4
    cpu = torch.rand(2, 3, 4, 4)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    want = ((cpu + 1) / 2 - tr.mean.float()) / tr.std.float()
    torch.testing.assert_close(tr(cpu), want)


# ----------------------------------------------------------------------------- model outputs, dense targets
class FakeModelOutput(OrderedDict):
    """transformers.utils.ModelOutput's behaviour: a dict of the non-None fields, also read as attributes
    and by integer index (``to_tuple()[i]``)."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, k):
        return self.to_tuple()[k] if isinstance(k, int) else super().__getitem__(k)

    def to_tuple(self):
        return tuple(self.values())


class Wrapped(nn.Module):
    """``net``'s output wrapped by ``wrap`` (a transformers-style output, a namespace, a tuple...)."""

    def __init__(self, net, wrap):
        super().__init__()
        self.net, self.wrap = net, wrap

    def forward(self, x):
        return self.wrap(self.net(x))


def test_guides_read_transformers_style_outputs():
    from types import SimpleNamespace

    x = torch.randn(2, 2, 3, 3, dtype=D)
    clf = SmallNet().to(D).eval()
    ref = ClassGuide(clf, 3, scale=2.0)(x, 5)
    for wrap in (lambda y: FakeModelOutput(loss=None, logits=y, hidden_states=(y,)),
                 lambda y: SimpleNamespace(logits=y), lambda y: (y, y * 0), lambda y: [y], lambda y: {"out": y}):
        guide = ClassGuide(Wrapped(clf, wrap), 3, scale=2.0)
        assert torch.equal(guide(x, 5), ref)
        assert torch.equal(fs.FastGuide(guide, None).runner(None)(x, 5), ref)
    net = DenseNet(1)
    depth = torch.randn(2, 3, 3, dtype=D)
    ref = DenseRegressionGuide(lambda z: net(z)[:, 0], depth)(x, 5)
    guide = DenseRegressionGuide(Wrapped(net, lambda y: FakeModelOutput(predicted_depth=y[:, 0])), depth)
    assert torch.equal(guide(x, 5), ref) and torch.equal(fs.FastGuide(guide, None).runner(None)(x, 5), ref)
    seg, labels = DenseNet(4), torch.randint(0, 4, (2, 3, 3))
    ref = SegmentationGuide(seg, labels)(x, 5)
    guide = SegmentationGuide(Wrapped(seg, lambda y: FakeModelOutput(logits=y)), labels)
    assert torch.equal(guide(x, 5), ref) and torch.equal(fs.FastGuide(guide, None).runner(None)(x, 5), ref)
    den = ToyDenoiser()  # a diffusers-style denoiser output (``.sample``)
    acp = torch.linspace(0.99, 0.1, 100, dtype=D)
    ref = X0HatGuide(clf, den, acp, 1)(x, 5)
    wrapped = X0HatGuide(clf, lambda z, t: FakeModelOutput(sample=den(z, t)), acp, 1)
    assert torch.equal(wrapped(x, 5), ref)
    for bad in (lambda y: FakeModelOutput(hidden_states=y), lambda y: SimpleNamespace(features=y), lambda y: "y"):
        with pytest.raises(ValueError, match=r"ClassGuide.*(FakeModelOutput|SimpleNamespace|str)"):
            ClassGuide(Wrapped(clf, bad), 3)(x, 5)


class HalfResNet(nn.Module):
    """A dense head at half the input resolution (as segmentation / depth networks at 1/4, 1/8...)."""

    def __init__(self, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(2, out_ch, 3, stride=2, padding=1).to(D)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_dense_targets_are_resized_to_the_output():
    x = torch.randn(2, 2, 8, 8, dtype=D)
    net = HalfResNet(1)
    depth = torch.randn(2, 1, 8, 8, dtype=D)
    small = F.interpolate(depth, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    guide = DenseRegressionGuide(net, depth, scale=2.0)
    ref = DenseRegressionGuide(net, small, scale=2.0)(x, 3)
    assert rel(guide(x, 3), ref) < 1e-12
    assert rel(fs.FastGuide(guide, None).runner(None)(x, 3), ref) < 1e-12
    assert rel(DenseRegressionGuide(net, depth[0], scale=2.0)(x[:1], 3),  # shared [1, H, W] target
               DenseRegressionGuide(net, small[0], scale=2.0)(x[:1], 3)) < 1e-12
    up = DenseRegressionGuide(DenseNet(1), torch.randn(2, 1, 3, 3, dtype=D))  # upsampled too
    assert torch.isfinite(up(x, 3)).all()
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(3, 1, 8, 8\)"):  # batch
        DenseRegressionGuide(net, torch.zeros(3, 1, 8, 8, dtype=D))(x, 3)
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 2, 8, 8\)"):  # channels
        DenseRegressionGuide(net, torch.zeros(2, 2, 8, 8, dtype=D))(x, 3)
    # a one-channel output's target may omit the channel: [H, W] shared, [B, H, W] per sample
    for no_channel in (depth[0, 0], depth[:, 0]):
        g = DenseRegressionGuide(net, no_channel, scale=2.0)(x if no_channel.dim() == 3 else x[:1], 3)
        want = ref if no_channel.dim() == 3 else DenseRegressionGuide(net, small[0], scale=2.0)(x[:1], 3)
        assert rel(g, want) < 1e-12
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(3, 8, 8\)"):  # [B, H, W] of another batch
        DenseRegressionGuide(net, torch.zeros(3, 8, 8, dtype=D))(x, 3)
    seg = HalfResNet(4)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[1, :2] = 255
    nearest = F.interpolate(labels[:, None].double(), size=(4, 4), mode="nearest-exact")[:, 0].long()
    guide = SegmentationGuide(seg, labels, ignore_index=255)
    ref = SegmentationGuide(seg, nearest, ignore_index=255)(x, 3)
    assert rel(guide(x, 3), ref) < 1e-12
    assert rel(fs.FastGuide(guide, None).runner(None)(x, 3), ref) < 1e-12
    assert rel(SegmentationGuide(seg, labels[0], ignore_index=255)(x[:1], 3),
               SegmentationGuide(seg, nearest[0], ignore_index=255)(x[:1], 3)) < 1e-12
    with pytest.raises(ValueError, match=r"logits shape \(2, 4, 4, 4\).*\(3, 8, 8\)"):
        SegmentationGuide(seg, torch.zeros(3, 8, 8, dtype=torch.long))(x, 3)


def test_input_transform_refuses_mismatched_statistics_and_bad_sizes():
    """A 1-value std with a 3-value mean was broadcast over the channels (and its checkpoint record was refused as
    damaged at load); sizes such as True (1x1), (224,) or 2.5 failed inside interpolate or resized to 1x1."""
    with pytest.raises(ValueError, match=r"^mean and std must have one value per channel each, got 3 and 1$"):
        input_transform((0.485, 0.456, 0.406), (0.5,))
    for bad in (True, (224,), 0, -3, (2.5, 3), "224", (224, 224, 3)):
        with pytest.raises(ValueError, match=r"^size must be a positive int or an \(H, W\) pair of them, got "):
            input_transform(size=bad)
    assert input_transform(size=[16, 24]).size == (16, 24) and input_transform(size=8).size == (8, 8)


def test_input_transform_default_gives_every_pixel_gradient_at_512_to_224():
    """input_transform() defaulted to antialias=False: a 512 -> 224 bilinear resize read ~23% of x_t's pixels
    with weight 0 (no guidance gradient there). The default is the registry's "auto"."""
    x = torch.zeros(1, 3, 512, 512, dtype=D, requires_grad=True)
    input_transform(size=224)(x).sum().backward()
    assert torch.isfinite(x.grad).all() and int((x.grad == 0).sum()) == 0
    x.grad = None
    input_transform(size=224, antialias=False)(x).sum().backward()
    assert (x.grad == 0).double().mean() > 0.2  # what the old default left without gradient
    y = torch.randn(1, 3, 300, 300, dtype=D)  # below 2x: plain bilinear, as before
    ref = F.interpolate((y + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(input_transform(None, None, 224)(y), ref)


def test_input_transform_antialiases_half_inputs_on_the_cpu():
    """The CPU antialiased resize has no float16 / bfloat16 kernel: a half x_t through the default transform (or the
    registry's) raised NotImplementedError; it is resized in float32 and given back in its dtype."""
    x = torch.randn(2, 3, 16, 16)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt).requires_grad_()
        y = input_transform(None, None, 4)(xh)
        want = F.interpolate(((xh.detach() + 1) * 0.5).float(), size=(4, 4), mode="bilinear", antialias=True).to(dt)
        assert y.dtype == dt and torch.equal(y, want)
        input_transform(size=4)(xh).float().sum().backward()
        assert xh.grad.dtype == dt and torch.isfinite(xh.grad).all() and int((xh.grad == 0).sum()) == 0


def test_dense_target_whose_first_dim_is_batch_and_channels_is_refused():
    """A [3, H, W] target for an output [3, 3, H, W] was silently read as shared [C, H, W] (a per-sample [B, H, W]
    map misread); [1, C, H, W] is the explicit shared form, [B, C, H, W] the per-sample one."""
    net = DenseNet(3)
    x = torch.randn(3, 2, 4, 4, dtype=D)
    shared = torch.randn(3, 4, 4, dtype=D)
    with pytest.raises(ValueError, match=r"target \(3, 4, 4\) is ambiguous .*\(3, 3, 4, 4\).*\[1, 3, \.\.\.\]"):
        DenseRegressionGuide(net, shared)(x, 3)
    with pytest.raises(ValueError, match="ambiguous"):
        fs.FastGuide(DenseRegressionGuide(net, shared), None).runner(None)(x, 3)

    def J(z):
        return -2.0 * ((net(z) - shared) ** 2).flatten(1).mean(1).sum()

    want = numerical_grad(J, x)
    for tgt in (shared[None], shared.expand(3, 3, 4, 4)):  # explicit shared, per sample
        g = DenseRegressionGuide(net, tgt, scale=2.0)(x, 3)
        assert torch.isfinite(g).all() and rel(g, want) < 1e-7
    # without the ambiguity, [C, H, W] is shared as documented
    assert rel(DenseRegressionGuide(net, shared, scale=2.0)(x[:2], 3), want[:2]) < 1e-7
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 4, 4\)"):  # [B, H, W] for C > 1 is not read
        DenseRegressionGuide(net, shared[:2])(x[:2], 3)


def test_dense_guides_skip_invalid_target_pixels():
    x = torch.randn(3, 2, 3, 3, dtype=D)
    net = DenseNet(1)
    depth = torch.randn(3, 1, 3, 3, dtype=D)
    depth[0, 0, 1, 1], depth[0, 0, 2, 0], depth[1, 0, 0, :] = float("nan"), float("inf"), float("-inf")
    depth[2] = float("nan")  # no valid pixel: no guidance, not NaN
    valid = torch.isfinite(depth)
    guide = DenseRegressionGuide(net, depth, scale=4.0)

    def J(z):
        err = torch.where(valid, net(z) - depth.nan_to_num(0, 0, 0), 0.0) ** 2
        return -4.0 * (err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).sum()

    g = guide(x, 3)
    assert rel(g, numerical_grad(J, x)) < 1e-7 and not g[2].any() and g[0].abs().sum() > 0
    assert torch.equal(fs.FastGuide(guide, None).runner(None)(x, 3), g)
    # resized: an invalid pixel drops out of its neighbours' bilinear weights instead of making them NaN
    big = torch.randn(3, 1, 8, 8, dtype=D)
    big[0, 0, 3, 3], big[2] = float("nan"), float("nan")
    ok = torch.isfinite(big)
    num = F.interpolate(big.nan_to_num(0), size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    den = F.interpolate(ok.to(D), size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    small = torch.where(den > 0, num / den.clamp_min(1e-12), float("nan"))
    net = HalfResNet(1)
    xb = torch.randn(3, 2, 8, 8, dtype=D)
    g = DenseRegressionGuide(net, big)(xb, 3)
    assert torch.isfinite(g).all() and not g[2].any()
    assert rel(g, DenseRegressionGuide(net, small)(xb, 3)) < 1e-12
    # segmentation: a sample whose pixels are all ignore_index gets zero guidance
    labels = torch.randint(0, 4, (3, 3, 3))
    labels[1] = -100
    g = SegmentationGuide(DenseNet(4), labels)(x, 3)
    assert torch.isfinite(g).all() and not g[1].any() and g[0].abs().sum() > 0


def test_half_dense_guides_at_256x256_keep_their_gradient():
    """A float16 guide network at 256x256: the pixel count 65536 (and the summed loss) overflowed float16 to inf,
    so the per-pixel mean's gradient was exactly zero. Checked against the same network in float64."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 256, 256)
    x64 = x.half().double()  # what the half network sees
    labels = torch.randint(0, 4, (256, 256))
    depth = torch.randn(256, 256)
    for k, guide_cls, tgt in ((4, SegmentationGuide, labels), (1, DenseRegressionGuide, depth)):
        net = nn.Conv2d(2, k, 1).half()
        got = guide_cls(net, tgt, scale=100.0)(x, 3)
        net64 = nn.Conv2d(2, k, 1).to(D).requires_grad_(False)
        net64.load_state_dict({n: v.double() for n, v in net.state_dict().items()})
        want = guide_cls(net64, tgt.double() if tgt.is_floating_point() else tgt, scale=100.0)(x64, 3)
        assert got.dtype == x.dtype and want.abs().sum() > 0
        assert rel(got.double(), want) < 1e-2, guide_cls.__name__
        with torch.autocast("cpu", dtype=torch.float16):  # a float32 network under float16 autocast: the same
            got = guide_cls(net.float(), tgt, scale=100.0)(x, 3)
        assert rel(got.double(), want) < 1e-2, guide_cls.__name__


def test_the_scale_multiplies_the_gradient_after_the_backward():
    """The scale multiplied the objective before the backward: a float16 network's backward at scale 1e5 overflowed
    (NaN/Inf RuntimeError) though 1e5 * d/dx log p is finite in float32. It multiplies the unscaled sum's gradient
    now, in float32; float64 gradients are unchanged (bit-equal where the scale is a power of two)."""
    torch.manual_seed(0)
    net16 = nn.Sequential(nn.Flatten(), nn.Linear(18, 5)).half().eval()
    net32 = nn.Sequential(nn.Flatten(), nn.Linear(18, 5)).eval()
    net32.load_state_dict({n: v.float() for n, v in net16.state_dict().items()})
    x, target = torch.randn(3, 2, 3, 3), torch.tensor([0, 2, 4])
    for scale in (1e5, torch.tensor([1e5, -3e5, 2e5])):
        want = ClassGuide(net32, target, scale=scale)(x.half().float(), 3)  # what the half network sees
        for guide in (ClassGuide(net16, target, scale=scale), fs.FastGuide(ClassGuide(net16, target, scale=scale),
                                                                           None).runner(None)):
            got = guide(x, 3)
            assert got.dtype == x.dtype and torch.isfinite(got).all() and want.abs().max() > 2e4
            assert rel(got, want) < 2e-3

    model = SmallNet().to(D).eval()
    xd, t = torch.randn(3, 2, 3, 3, dtype=D), torch.tensor([3, 500, 900])

    def scaled_before(s):
        z = xd.clone().requires_grad_(True)
        logp = F.log_softmax(model(z), -1).gather(1, target.view(-1, 1)).squeeze(1)
        return torch.autograd.grad((logp * s).sum(), z)[0]
    for s, exact in ((1.0, True), (4.0, True), (torch.tensor([2.0, -0.5, 8.0], dtype=D), True), (3.7, False),
                     (torch.tensor([0.3, 1.7, -2.2], dtype=D), False)):
        got, want = ClassGuide(model, target, scale=s)(xd, t), scaled_before(s)
        assert torch.isfinite(want).all() and want.abs().min() > 0
        assert torch.equal(got, want) if exact else rel(got, want) < 1e-14, s


def test_half_class_logits_take_their_log_softmax_in_float32():
    """ClassGuide / X0HatGuide took log_softmax in the network's dtype: bfloat16 log-probabilities 0.4-2% off. They
    are taken in float32 now (as the dense guides' losses); checked against float64 on the same logits."""
    torch.manual_seed(0)
    x, target = torch.randn(4, 2, 3, 3), torch.tensor([0, 3, 5, 7])
    for dt in (torch.bfloat16, torch.float16):
        net = nn.Sequential(nn.Flatten(), nn.Linear(18, 8)).to(dt).eval()
        with torch.no_grad():
            net[1].weight.mul_(4)  # logits of a few units: log p far from 0
        guide = ClassGuide(net, target)
        logits = net(x.to(dt)).double()
        want = F.log_softmax(logits, -1).gather(1, target.view(-1, 1)).squeeze(1)
        got = guide.objective(x, torch.full((4,), 3))
        assert want.abs().min() > 0.5 and rel(got.double(), want) < 1e-6, dt
        assert got.dtype == torch.float32


def test_segmentation_void_label_hint():
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0] = 255  # VOC / ADE20K / Cityscapes void label
    with pytest.raises(ValueError, match="ignore_index=255"):
        SegmentationGuide(DenseNet(4), labels)(torch.randn(2, 2, 3, 3, dtype=D), 3)


# ----------------------------------------------------------------------------- as_cond_fn, train mode
def test_as_cond_fn_y_overrides_the_class_sub_guides_of_a_composed_guide():
    clf, x, t = SmallNet().to(D).eval(), torch.randn(2, 2, 3, 3, dtype=D), torch.tensor([10, 900])
    y = torch.tensor([4, 2])
    acp, den = torch.linspace(0.99, 0.1, 1000, dtype=D), ToyDenoiser()
    dense = DenseRegressionGuide(DenseNet(1), torch.randn(2, 1, 3, 3, dtype=D), scale=0.5)
    comp = ComposedGuide([(ClassGuide(clf, 0, scale=2.0), 1.0), (dense, -3.0),  # dense: no class target
                          (ComposedGuide([X0HatGuide(clf, den, acp, 1)]), 0.5)])
    want = ClassGuide(clf, y, scale=2.0)(x, t) - 3.0 * dense(x, t) + 0.5 * X0HatGuide(clf, den, acp, y)(x, t)
    assert rel(as_cond_fn(comp)(x, t, y=y), want) < 1e-12
    assert rel(as_cond_fn(comp)(x, t), comp(x, t)) < 1e-12 and rel(comp(x, t), want) > 1e-3
    assert rel(as_cond_fn(fs.FastGuide(comp, None))(x, t, y=y), want) < 1e-12
    assert rel(as_cond_fn(fs.FastGuide(ClassGuide(clf, 0, scale=2.0), None))(x, t, y=y),
               ClassGuide(clf, y, scale=2.0)(x, t)) < 1e-12


def test_as_cond_fn_y_reaches_a_class_part_added_to_the_composed_guide_later():
    """as_cond_fn decided at creation whether the guide takes y: a ClassGuide appended to the ComposedGuide's list
    afterwards kept its own target, y dropped without a word."""
    clf, x, t = SmallNet().to(D).eval(), torch.randn(2, 2, 3, 3, dtype=D), torch.tensor([10, 900])
    y = torch.tensor([4, 2])
    dense = DenseRegressionGuide(DenseNet(1), torch.randn(2, 1, 3, 3, dtype=D), scale=0.5)
    comp = ComposedGuide([dense])
    cond_fn = as_cond_fn(comp)
    comp.guides.append((ClassGuide(clf, 0, scale=2.0), 1.0))
    want = dense(x, t) + ClassGuide(clf, y, scale=2.0)(x, t)
    assert rel(cond_fn(x, t, y=y), want) < 1e-12 and rel(comp(x, t), want) > 1e-3


def test_train_mode_warning_covers_the_x0hat_denoiser_and_later_train_calls():
    class DropoutDenoiser(ToyDenoiser):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, t):
            return super().forward(self.drop(x), t)

    clf, den = SmallNet().to(D).eval(), DropoutDenoiser()
    x, acp = torch.randn(2, 2, 3, 3, dtype=D), torch.linspace(0.99, 0.1, 100, dtype=D)
    with pytest.warns(RuntimeWarning, match="train mode"):
        X0HatGuide(clf, den, acp, 1)(x, 5)
    with pytest.warns(RuntimeWarning, match="train mode"):
        fs.FastGuide(X0HatGuide(clf, den, acp, 1), None).runner(None)(x, torch.tensor([5, 5]))
    den.eval()
    guide = ClassGuide(clf, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        guide(x, 5)
        X0HatGuide(clf, den, acp, 1)(x, 5)
    clf.bn.train()  # a later .train() of one submodule is still seen
    with pytest.warns(RuntimeWarning, match="train mode"):
        guide(x, 5)


def test_train_mode_check_does_not_walk_the_modules_every_call(monkeypatch):
    clf, x = SmallNet().to(D).eval(), torch.randn(2, 2, 3, 3, dtype=D)
    guide = ClassGuide(clf, 1)
    guide(x, 5)
    walks = []
    real = nn.Module.modules
    monkeypatch.setattr(nn.Module, "modules", lambda self: walks.append(self) or real(self))
    for _ in range(3):
        guide(x, 5)
    assert walks == []


def test_channel_mismatch_names_the_fix():
    """A grey x_t into a 3-channel (here: 2-channel) guide network is one ValueError naming input_transform,
    on the reference guide and on the fast path, not the conv's RuntimeError."""
    from ppap_fast.fast_sampling import FastGuide

    g = ClassGuide(SmallNet().eval(), target=1, scale=1.0)
    x, t = torch.randn(2, 1, 6, 6), torch.tensor([10, 20])
    with pytest.raises(ValueError, match=r"takes 2: .*input_transform=lambda x: x.expand\(-1, 2, -1, -1\)"):
        g(x, t)
    with pytest.raises(ValueError, match="input_transform"):
        FastGuide(g, torch.device("cpu"))(x, t, None)
    fixed = ClassGuide(SmallNet().eval(), target=1, scale=1.0, input_transform=lambda x: x.expand(-1, 2, -1, -1))
    assert fixed(x, t).shape == x.shape


def test_x0hat_guide_takes_a_base_schedule_and_refuses_a_respaced_one():
    from ppap_fast.schedule import Schedule

    clf = SmallNet().eval()
    den = lambda x, t: torch.zeros_like(x)  # noqa: E731
    base = Schedule.create("linear", 1000)
    a = X0HatGuide(clf, den, base, target=1)
    b = X0HatGuide(clf, den, base.alphas_cumprod, target=1)
    x, t = torch.randn(2, 2, 6, 6), torch.tensor([100, 900])
    assert torch.equal(a(x, t), b(x, t))
    with pytest.raises(ValueError, match=r"respaced Schedule with 25 of 1000 steps"):
        X0HatGuide(clf, den, Schedule.create("linear", 1000, respacing="ddim25"), target=1)


def test_guide_network_on_another_device_names_the_fix():
    """A guide network left on another device than x_t (here 'meta', CPU-only CI) is one ValueError naming .to()."""
    from ppap_fast.fast_sampling import FastGuide

    g = ClassGuide(SmallNet().eval().to("meta"), target=1, scale=1.0)
    x, t = torch.randn(2, 2, 6, 6), torch.tensor([10, 20])
    with pytest.raises(ValueError, match=r"SmallNet\) is on meta but x_t is on cpu: move it with \.to\('cpu'\)"):
        g(x, t)
    with pytest.raises(ValueError, match="is on meta but x_t is on cpu"):
        FastGuide(g, torch.device("cpu"))(x, t, None)


def test_readme_guides_import_from_the_package():
    """README lists every guide under one contract; each imports from the top level like ClassGuide."""
    import ppap_fast
    from ppap_fast import guidance

    for name in ("ClassGuide", "X0HatGuide", "DenseRegressionGuide", "SegmentationGuide", "ComposedGuide",
                 "as_cond_fn"):
        assert getattr(ppap_fast, name) is getattr(guidance, name)
        assert name in dir(ppap_fast)


def test_network_passed_as_guide_names_the_fix():
    """guide=classifier / guide=bank (instead of ClassGuide(...)) is one TypeError naming ClassGuide, on the
    reference loop, the fast sampler and the diffusers correction, not a forward() arity or grad-shape error."""
    from ppap_fast.fast_sampling import FastGuidedSampler
    from ppap_fast.integrations.diffusers import PPAPGuidance
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    den = lambda x, t: torch.zeros_like(x)  # noqa: E731
    s = Schedule.create("linear", 1000, respacing="ddim2")
    clf = SmallNet().eval()
    bank = ExpertBank(clf, "generic", 5).eval()
    for net in (clf, bank):
        with pytest.raises(TypeError, match=rf"network {type(net).__name__} itself.*ClassGuide\(model.eval\(\)"):
            sample_loop(den, (2, 2, 6, 6), s, sampler="ddim", guide=net)
    with pytest.raises(TypeError, match="got the network ExpertBank itself"):
        FastGuidedSampler(den, s, sampler="ddim", guide=bank).sample((2, 2, 6, 6))

    class Sched:
        alphas_cumprod = Schedule.create("linear", 1000).alphas_cumprod.float()
        config = None
    with pytest.raises(TypeError, match="got the network ExpertBank itself"):
        PPAPGuidance(bank).correct(torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6), 1, Sched())


def test_network_inside_composed_guide_or_as_cond_fn_names_the_fix():
    # as_cond_fn(bank) returned the logits as the "gradient"; a network inside a ComposedGuide failed with its
    # forward()'s arity or a grad-shape error
    from ppap_fast.fast_sampling import FastGuidedSampler
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    den = lambda x, t: torch.zeros_like(x)  # noqa: E731
    s = Schedule.create("linear", 1000, respacing="ddim2")
    clf = SmallNet().eval()
    bank = ExpertBank(clf, "generic", 5).eval()
    x, t = torch.randn(2, 2, 6, 6), torch.tensor([3, 700])
    for net in (clf, bank):
        want = rf"network {type(net).__name__} itself.*ClassGuide\(model.eval\(\)"
        with pytest.raises(TypeError, match=want):
            as_cond_fn(net)(x, t)
        with pytest.raises(TypeError, match=want):
            sample_loop(den, (2, 2, 6, 6), s, guide=ComposedGuide([(ClassGuide(clf, 1), 1.0), (net, 1.0)]))
        with pytest.raises(TypeError, match=want):
            FastGuidedSampler(den, s, guide=ComposedGuide([net])).sample((2, 2, 6, 6))


def test_guides_take_numpy_integer_timesteps():
    """ClassGuide(bank, 3)(x, np.int64(500)) was refused ('got int64') where an int works; numpy floats / bools
    are refused as Python floats / bools are."""
    import numpy as np

    clf = SmallNet().to(D).eval()
    x = torch.randn(2, 2, 3, 3, dtype=D)
    den, acp = ToyDenoiser(), torch.linspace(0.99, 0.1, 100, dtype=D)
    guides = [ClassGuide(clf, 3), X0HatGuide(clf, den, acp, 1),
              SegmentationGuide(DenseNet(4).to(D), torch.randint(0, 4, (2, 3, 3)))]
    for guide in guides:
        want = guide(x, 50)
        for t in (np.int64(50), np.int32(50), np.array(50), np.array([50, 50])):
            assert torch.equal(guide(x, t), want)
            assert torch.equal(fs.FastGuide(guide, None)(x, t), want)
        for bad in (50.0, np.float64(50), np.float32(50), True, np.bool_(True)):
            with pytest.raises(ValueError, match="t must be an int or an integer tensor"):
                guide(x, bad)
        with pytest.raises(ValueError, match="integer original timesteps"):
            guide(x, np.array([50.0, 50.0]))


def test_x0hat_in_fp16_keeps_the_small_t_correction():
    """In fp16 the alpha-bar table rounded 0.9999 to 1: 1 - abar = 0, so x0_hat = x_t at small t."""
    from ppap_fast.schedule import Schedule

    acp = Schedule.create("linear", 1000).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    guide = X0HatGuide(SmallNet().to(D).eval(), lambda z, t: eps.to(z.dtype), acp, 1)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 5])
    ab = acp[t].view(-1, 1, 1, 1)
    want = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    x16 = x.half()
    got = guide.x0_hat(x16, t)
    assert got.dtype == torch.float16
    want16 = (x16.double() - (1 - ab).sqrt() * eps.half().double()) / ab.sqrt()  # the same inputs, exactly
    err = (got.double() - want16).abs().max()
    assert err <= 1e-3 * want16.abs().max(), err  # fp16 rounding of the result only
    assert (got.double() - want).abs().max() <= 2e-3 * want.abs().max()
    assert not torch.equal(got, x16)  # the eps term (sqrt(1 - abar) ~ 0.01) is not lost


def test_per_call_labels_are_range_checked_once_while_unchanged(monkeypatch):
    """Labels passed at every step (the diffusers pipeline's class_labels) had their min / max read every step (two
    host syncs on a GPU); the same tensor is now checked once, and again after an in-place change."""
    from ppap_fast import guidance as gd

    g = ClassGuide(SmallNet().eval(), target=0, scale=1.0)
    x, t = torch.randn(2, 2, 6, 6), torch.tensor([5, 5])
    y = torch.tensor([1, 3])
    checks = []
    init = gd._ClassTarget.__init__

    def counted_init(self, *a, **k):
        checks.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(gd._ClassTarget, "__init__", counted_init)
    want = g(x, t, target=torch.tensor([1, 3]))
    checks.clear()
    for _ in range(3):
        got = g(x, t, target=y)
        assert torch.isfinite(got).all() and torch.equal(got, want)
    assert len(checks) == 1
    y[1] = 7  # out of range for 5 classes: must be seen
    with pytest.raises(ValueError, match="out of range"):
        g(x, t, target=y)
    y[1] = 2
    changed = g(x, t, target=y)
    assert torch.isfinite(changed).all() and not torch.equal(changed, want)
    assert torch.equal(g(x, t, target=torch.tensor([1, 2])), g(x, t, target=y))


def test_prechecked_targets_is_per_thread():
    """prechecked_targets() (set while a FastGuide's compiled guide runs) was a module-wide flag: a compiled guide
    of another thread, traced meanwhile, skipped the range check of its own labels."""
    import threading

    from torch._dynamo.utils import counters

    from ppap_fast import guidance as gd

    ct = gd._ClassTarget(0, 4, "guide")  # the class count is known: 4
    logits = torch.randn(2, 4)
    f = torch.compile(lambda lg, y: ct.select(lg, y), backend="eager")
    inside, done = threading.Event(), threading.Event()

    def holder():
        with gd.prechecked_targets():
            inside.set()
            done.wait(60)

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert inside.wait(60)
        with pytest.raises(ValueError, match="target class 9 is out of range for a model with 4 classes"):
            f(logits, torch.tensor([9, 0]))
    finally:
        done.set()
        th.join()
    y = torch.tensor([3, 1])
    counters.clear()
    with gd.prechecked_targets():  # in its own thread it still skips the range read (a graph break)
        got = f(logits, y)
    assert not counters["graph_break"] and torch.equal(got, ct.select(logits, y))


def test_as_cond_fn_maps_rescaled_float_timesteps_back_to_the_original_t():
    """guided-diffusion with rescale_timesteps=True (improved-diffusion models need it) hands cond_fn t * 1000 / T
    as float32: with num_timesteps=T each sample's expert is chosen by its original t."""
    x = torch.randn(3, 2, 4, 4, dtype=D)
    for T, t in ((1000, torch.tensor([999, 200, 199])), (4000, torch.tensor([3999, 800, 799]))):
        bank = ExpertBank(SmallNet().to(D), "generic", n_experts=5, num_timesteps=T).eval()
        with torch.no_grad():
            for name, p in bank.per_expert_state_dict().items():
                if name.endswith(("running_mean", "lora_A", "lora_B", "bias")):
                    p.normal_(0, 0.3)
        guide = ClassGuide(bank, torch.tensor([0, 2, 4]), scale=1.5)
        want = guide(x, t)
        rescaled = t.float() * (1000.0 / T)  # guided-diffusion's _scale_timesteps / _WrappedModel
        g = as_cond_fn(guide, num_timesteps=T)(x, rescaled)
        assert torch.isfinite(want).all() and torch.equal(g, want)
        assert rel(guide(x, torch.tensor([999, 999, 999]) * (T // 1000)), want) > 1e-3  # the experts differ
    with pytest.raises(ValueError, match=r"not t \* 1000 / T for integer t in \[0, 4000\)"):
        as_cond_fn(guide, num_timesteps=4000)(x, torch.tensor([0.1, 3.0, 5.0]))
    with pytest.raises(ValueError, match=r"pass as_cond_fn\(guide, num_timesteps=T\)"):
        as_cond_fn(guide)(x, torch.tensor([0.0, 3.0, 5.0]))


def test_as_cond_fn_with_num_timesteps_refuses_a_bank_of_another_T():
    """A T=500 diffusion's t in [0, 500) would reach only experts 0-2 of a T=1000 bank, silently."""
    guide = ClassGuide(small_bank(), torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"T=500 base timesteps, but an ExpertBank of the guide splits T=1000"):
        as_cond_fn(guide, num_timesteps=500)
    with pytest.raises(ValueError, match=r"num_timesteps must be the diffusion's base T \(a positive int\), got 0"):
        as_cond_fn(guide, num_timesteps=0)
    assert torch.isfinite(as_cond_fn(guide, num_timesteps=1000)(torch.randn(3, 2, 4, 4, dtype=D),
                                                                 torch.tensor([5, 500, 999]))).all()


def test_x0hat_guide_of_another_beta_schedule_than_the_sampler_is_refused():
    """Same T, other betas (cosine table, linear sampler): x0-hat took the wrong abar_t with no error."""
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    def denoiser(x, t):
        return 0.5 * x

    classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5)).to(D).eval()
    sampler_schedule = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(2, 2, 3, 3, dtype=D)
    other = X0HatGuide(classifier, denoiser, Schedule.create("cosine", 1000), 2)
    with pytest.raises(ValueError, match=r"X0HatGuide's alphas_cumprod is not the sampler schedule's"):
        sample_loop(denoiser, x_T, sampler_schedule, guide=other)
    with pytest.raises(ValueError, match=r"X0HatGuide's alphas_cumprod is not the sampler schedule's"):
        fs.FastGuidedSampler(denoiser, sampler_schedule, guide=other)
    same = X0HatGuide(classifier, denoiser, Schedule.create("linear", 1000), 2)
    assert torch.isfinite(sample_loop(denoiser, x_T, sampler_schedule, guide=same)).all()
