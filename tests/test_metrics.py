import types

import numpy as np
import pytest
import torch

from ppap_fast.metrics import evaluator_outputs, frechet_distance, inception_score, precision_recall


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shift_is_the_squared_mean_difference():
    x = np.random.default_rng(1).normal(size=(400, 8))
    d = np.arange(8) * 0.1
    assert frechet_distance(x, x + d) == pytest.approx(float((d ** 2).sum()), rel=1e-6, abs=1e-8)
    # and matches the textbook formula with scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    y = np.random.default_rng(2).normal(size=(400, 8)) * 1.5 + 0.3
    m1, m2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(0).normal(size=(100, 5))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    p, r = precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    # a fake set collapsed onto a few real points: high precision, low recall
    p, r = precision_recall(x, np.repeat(x[:5], 20, axis=0), k=3)
    assert p == 1.0 and r < 0.3


def test_inception_score_bounds():
    k = 10
    onehot = np.eye(k)[np.arange(200) % k]
    assert inception_score(onehot) == pytest.approx(k, rel=1e-6)
    assert inception_score(np.tile(np.eye(k)[:1], (50, 1))) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(np.full((50, k), 1 / k)) == pytest.approx(1.0, rel=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    # these failed inside numpy (broadcast / axis / index errors) naming neither argument
    r = np.random.default_rng(0).normal(size=(10, 4))
    for a, b in ((r, r[:, :3]), (r[:, 0], r[:, 0]), (r.reshape(10, 2, 2), r.reshape(10, 2, 2))):
        with pytest.raises(ValueError, match="feature arrays must be N x D with equal D"):
            precision_recall(a, b)
    for k in (2.5, True, 0):
        with pytest.raises(ValueError, match="k must be an int of at least 1"):
            precision_recall(r, r, k=k)


def test_bfloat16_tensors_are_scored():
    # numpy has no bfloat16: 'Got unsupported ScalarType BFloat16'
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g) + 1
    assert frechet_distance(a.bfloat16(), b.bfloat16()) == pytest.approx(
        frechet_distance(a.bfloat16().float(), b.bfloat16().float()))
    p = torch.softmax(a, 1)
    assert inception_score(p.bfloat16()) == pytest.approx(inception_score(p.bfloat16().float()))


def test_evaluator_outputs_restores_the_evaluators_mode():
    # it switched the evaluator to eval mode for good: a training loop scoring its model went on in eval mode
    ev = _Evaluator().train()
    modes = []
    features = ev.features
    ev.features = lambda x: modes.append(ev.training) or features(x)
    evaluator_outputs(ev, torch.rand(3, 1, 2, 2) * 2 - 1)
    assert modes == [False] and ev.training
    ev.eval()
    evaluator_outputs(ev, torch.rand(3, 1, 2, 2) * 2 - 1)
    assert not ev.training


def test_evaluator_outputs_refuses_integer_images_and_bad_batch_size():
    # uint8 pixels went to the evaluator as 0..255 floats, scored as [-1, 1] images without an error
    ev = _Evaluator()
    with pytest.raises(ValueError, match=r"images must be a floating tensor in \[-1, 1\], got torch.uint8"):
        evaluator_outputs(ev, torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluator_outputs(ev, torch.zeros(3, 1, 2, 2), batch_size=0)
    assert evaluator_outputs(ev, torch.zeros(3, 1, 2, 2), batch_size=np.int64(2))[0].shape == (3, 4)



@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_evaluator_outputs_refuses_non_finite_images(value):
    """NaN skipped the [0, 255] range check (min / max are NaN) and went to the evaluator: one that maps NaN to a
    finite value (a ReLU-like where) gave finite features and probabilities for it, scored silently."""
    ev = _Evaluator()
    ev.features = lambda x: torch.where(x > 0, x, torch.zeros_like(x)).flatten(1)
    images = torch.zeros(3, 1, 2, 2)
    images[1, 0, 1, 1] = value
    with pytest.raises(ValueError, match=r"^images hold 1 non-finite values \(NaN/Inf\)"):
        evaluator_outputs(ev, images)

def test_evaluator_outputs_refuses_float_images_of_0_to_255_pixels():
    # float 0..255 pixels (a uint8 array cast with .float()) were scored as [-1, 1] images without an error
    ev = _Evaluator()
    images = torch.arange(12, dtype=torch.float32).view(3, 1, 2, 2) * 20
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\], got values in \[0, 220\] \(0..255 pixels"):
        evaluator_outputs(ev, images)
    assert evaluator_outputs(ev, images / 127.5 - 1)[0].shape == (3, 4)
    assert evaluator_outputs(ev, images / 220 * 1.5)[0].shape == (3, 4)  # unclipped samples slightly above 1


class _Evaluator(torch.nn.Module):
    """A fake evaluator (features + fc) that records the device, dtype and grad mode of its inputs."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3).to(dtype)
        self.seen = []

    def features(self, x):
        self.seen.append((type(x), x.dtype, torch.is_grad_enabled()))
        return x.flatten(1)[:, :4] * 2 + self.fc.weight.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_evaluator_outputs_uses_the_evaluators_dtype_without_autograd(dtype):
    # the images went in as float32 whatever the evaluator's dtype: a half / bf16 / float64 one failed
    ev = _Evaluator(dtype).requires_grad_(True)
    images = torch.rand(5, 1, 2, 2) * 2 - 1
    feats, probs = evaluator_outputs(ev, images, batch_size=2)
    assert [s[1] for s in ev.seen] == [dtype] * 3 and not any(s[2] for s in ev.seen)
    assert feats.shape == (5, 4) and probs.shape == (5, 3) and feats.dtype == probs.dtype == np.float64
    assert np.allclose(probs.sum(1), 1)


class _OnDevice(torch.Tensor):
    """CPU data standing for a CUDA tensor: .numpy() refuses it, as it refuses a CUDA tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu()")
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_evaluator_outputs_moves_batches_to_the_evaluators_device_and_back(monkeypatch):
    # a CUDA evaluator got CPU images, and its CUDA outputs were converted with .numpy()
    ev = _Evaluator()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ev, "parameters", lambda recurse=True: iter(
        [types.SimpleNamespace(device=cuda, dtype=torch.float32, is_floating_point=lambda: True)]))
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        if dev is not None and torch.device(dev).type == "cuda":
            args = tuple("cpu" if a is dev else a for a in args)
            kwargs = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
            return real_to(self, *args, **kwargs).as_subclass(_OnDevice)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    feats, probs = evaluator_outputs(ev, torch.rand(3, 1, 2, 2) * 2 - 1, batch_size=2)
    assert [s[0] for s in ev.seen] == [_OnDevice] * 2
    assert feats.shape == (3, 4) and probs.shape == (3, 3)


@pytest.mark.parametrize("bad_labels", [lambda y: y[:, None], lambda y: y[:1], lambda y: y[:-1]])
def test_score_samples_refuses_labels_that_do_not_match_the_images(bad_labels):
    # (N, 1) labels broadcast against the (N,) argmax into an N x N table: a wrong accuracy, silently
    from ppap_fast.metrics import score_samples

    images = torch.rand(6, 1, 2, 2) * 2 - 1
    ev = _Evaluator()
    labels = np.asarray(evaluator_outputs(ev, images)[1].argmax(1))  # every sample "on target"
    assert score_samples(ev, images, labels, images)["target_accuracy"] == 1.0
    with pytest.raises(ValueError, match="labels must have shape"):
        score_samples(ev, images, bad_labels(labels), images)


def test_score_samples_refuses_labels_that_are_not_class_indices():
    # float labels were cast to int64: 2.7 scored as class 2, NaN as an arbitrary class, silently
    from ppap_fast.metrics import score_samples

    images = torch.rand(6, 1, 2, 2) * 2 - 1
    ev = _Evaluator()
    labels = evaluator_outputs(ev, images)[1].argmax(1)
    for ok in (labels, labels.astype(np.float32), torch.from_numpy(labels)):
        assert score_samples(ev, images, ok, images)["target_accuracy"] == 1.0
    for bad in (labels + 0.7, np.where(np.arange(6) == 0, np.nan, labels), labels.astype(str)):
        with pytest.raises(ValueError, match="labels must be integer class indices"):
            score_samples(ev, images, bad, images)
    for bad in (np.where(np.arange(6) == 0, 3, labels), np.where(np.arange(6) == 0, -1, labels)):
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):  # were never on target
            score_samples(ev, images, bad, images)


def test_frechet_distance_refuses_features_whose_covariance_overflows():
    x = np.random.default_rng(0).normal(size=(10, 3)) * 1e200  # finite, but squares overflow float64
    with pytest.raises(ValueError, match="overflows"):
        frechet_distance(x, x * 0.5)


@pytest.mark.parametrize("shift, scale", [(1e8, 1.0), (0.0, 1e-9)])
def test_precision_recall_is_translation_and_scale_invariant(shift, scale):
    # |a|^2 + |b|^2 - 2 a.b on uncentred features cancelled the distances away under a large mean
    # (precision 0.63 off at 1e8), and an absolute 1e-9 tie tolerance swamped features of scale 1e-9
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) * 1.3 + 0.5
    expected = precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real * scale + shift, fake * scale + shift) == expected


def test_evaluate_samples_does_not_reuse_another_evaluators_real_features(monkeypatch):
    # the held-out set's features were cached under id(evaluator): weights loaded in place (or a new
    # evaluator at a freed one's address) were scored against the old network's real features
    from ppap_fast import demo
    from ppap_fast.models.tiny import EvalNet

    monkeypatch.setattr(demo, "_REAL_CACHE", {})
    torch.manual_seed(0)
    ev, other = EvalNet(width=4, feat_dim=8).eval(), EvalNet(width=4, feat_dim=8).eval()
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(8) % 10
    demo.evaluate_samples(images, labels, ev)
    ev.load_state_dict(other.state_dict())  # same object, another network
    got = demo.evaluate_samples(images, labels, ev)
    demo._REAL_CACHE.clear()
    assert got == demo.evaluate_samples(images, labels, ev)


def test_inception_score_averages_splits_of_5000_as_guided_diffusion():
    """Past 5000 samples the score is the mean over consecutive splits of 5000 (the last shorter), as
    guided-diffusion's evaluator computes it: here two halves that each name one class (score 1 each)
    while the whole set spans two (one split: 2)."""
    k = 4
    first, second = np.tile(np.eye(k)[:1], (5000, 1)), np.tile(np.eye(k)[1:2], (2500, 1))
    probs = np.concatenate([first, second])
    assert inception_score(probs) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(probs, split_size=len(probs)) == pytest.approx(np.exp(-(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3)), rel=1e-6)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(probs, split_size=0)


def test_inception_score_warns_of_a_short_last_split_and_keeps_the_evaluators_value():
    """N=5001: splits of 5000 and 1, the single row's score 1 averaged in as guided-diffusion's evaluator does
    (kept, comparable), without a word that the result is biased."""
    import warnings

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.1), size=5001)
    with pytest.warns(UserWarning, match=r"the last split holds 1 of 5001 rows \(splits of 5000\).*biased low: "
                                         r"score 5000 or 10000 samples \(a multiple of 5000\)"):
        got = inception_score(probs)

    def split_score(part):
        py = part.mean(0)
        return np.exp((part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean())

    assert np.isfinite(got) and got == pytest.approx((split_score(probs[:5000]) + 1.0) / 2, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a last split of half the others or more, one split, whole splits: silent
        for n in (7500, 4999, 10000):
            assert np.isfinite(inception_score(np.concatenate([probs, probs])[:n]))


def _precision_recall_full(real, fake, k):
    """The former N x N computation (sorted full distance matrices), as the reference for the chunked one."""
    def pairwise(a, b):
        return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0, None))

    r, f = real - real.mean(0), fake - real.mean(0)
    f_own = f - f.mean(0)
    tol = 1e-9 * max(np.sqrt((r * r).sum(1).mean()), np.sqrt((f_own * f_own).sum(1).mean()))
    r_rad = np.sort(pairwise(r, r), 1)[:, min(k, len(r) - 1)]
    f_rad = np.sort(pairwise(f_own, f_own), 1)[:, min(k, len(f) - 1)]
    d = pairwise(f, r)
    return float((d <= r_rad[None] + tol).any(1).mean()), float((d.T <= f_rad[None] + tol).any(1).mean())


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_in_row_chunks_equals_the_full_matrices(k):
    # it built N x N float64 matrices: ~20 GB each at 50k samples, out of memory at the papers' protocol
    rng = np.random.default_rng(k)
    real = rng.integers(-4, 3, size=(60, 3)).astype(np.float64)  # a small lattice: many tied distances
    fake = np.concatenate([rng.integers(0, 5, size=(30, 3)), real[:9]]).astype(np.float64)  # duplicates
    fake[-3:] = fake[-4]  # a point 4 times: radius 0 for k <= 3
    expected = _precision_recall_full(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for chunk in (1, 2, 5, 38, 39, 59, 60, 1000, np.int64(4)):
        assert precision_recall(real, fake, k, chunk=chunk) == expected, chunk
    assert precision_recall(real, fake, k) == expected
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            precision_recall(real, fake, k, chunk=bad)


def test_precision_recall_keeps_its_distance_matrices_to_chunk_rows(monkeypatch):
    from ppap_fast import metrics

    shapes = []
    pairwise = metrics._pairwise
    monkeypatch.setattr(metrics, "_pairwise", lambda a, b, *sq: shapes.append((len(a), len(b))) or pairwise(a, b, *sq))
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(50, 4)), rng.normal(size=(40, 4)) + 0.3
    expected = _precision_recall_full(real, fake, 3)
    assert precision_recall(real, fake, chunk=7) == expected
    assert max(r for r, _ in shapes) == 7 and max(r * c for r, c in shapes) <= 7 * 50
    # every row of each matrix was computed: 50 + 40 for the radii, 40 against the real set
    assert sum(r for r, _ in shapes) == 50 + 40 + 40


def test_precision_recall_computes_each_matrix_norms_once(monkeypatch):
    """_pairwise recomputed |b|^2 (an N x D temporary) for every row chunk: given once per matrix, same bits."""
    from ppap_fast import metrics

    calls = []
    pairwise = metrics._pairwise

    def spy(a, b, b_sq=None):
        calls.append((b, b_sq))
        out = pairwise(a, b, b_sq)
        assert np.array_equal(out, pairwise(a, b)), "not bit-identical to the norms computed per chunk"
        return out

    monkeypatch.setattr(metrics, "_pairwise", spy)
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(50, 4)) * 3 + 1, rng.normal(size=(40, 4)) + 0.3
    expected = _precision_recall_full(real, fake, 3)
    assert precision_recall(real, fake, chunk=7) == expected
    by_matrix = {}
    for b, b_sq in calls:
        assert b_sq is not None and np.array_equal(b_sq, (b * b).sum(1))
        by_matrix.setdefault(id(b), set()).add(id(b_sq))
    assert len(by_matrix) == 2 and all(len(v) == 1 for v in by_matrix.values())  # r (radii and fake x real), f_own


def test_precision_recall_peak_memory_follows_the_chunk_not_n_squared():
    import tracemalloc

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8)) + 0.3
    tracemalloc.start()
    try:
        precision_recall(real, fake, chunk=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 100 * 1500 * 8  # a few chunk x N float64 temporaries; one N x N matrix is 15x that


def test_inception_score_renormalises_rows_that_sum_to_nearly_1():
    # rows summing to 1 +- 0.01 (fp16 softmax) were accepted as they were: each row's KL scaled by its sum
    def hand(rows):  # the formula on the renormalised rows
        q = rows / rows.sum(1, keepdims=True)
        py = q.mean(0)
        return float(np.exp((q * (np.log(q + 1e-12) - np.log(py + 1e-12))).sum(1).mean()))

    rng = np.random.default_rng(0)
    exact = rng.dirichlet(np.full(6, 0.3), size=40)
    off = exact * rng.uniform(0.991, 1.009, size=(40, 1))
    assert 1.5 < hand(exact) < 6 and hand(off) == pytest.approx(hand(exact), rel=1e-12)
    assert inception_score(off) == pytest.approx(hand(exact), rel=1e-12)
    half = torch.from_numpy(off).half()
    assert inception_score(half) == pytest.approx(hand(half.double().numpy()), rel=1e-12)
