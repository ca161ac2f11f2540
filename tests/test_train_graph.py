"""GraphedTrainStep: a whole training step in one CUDA graph (CUDA tests marked ``cuda``; CPU: the
fallback and argument checks)."""
import contextlib
import dataclasses
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ppap_fast import distributed as D
from ppap_fast.experts import ExpertBank
from ppap_fast.ops import lora as L
from ppap_fast.models.tiny import TinyResNet
from ppap_fast.train_graph import GraphedTrainStep, why_no_graph

from _util import rel, requires_cuda


def test_lora_backend_preference(monkeypatch):
    """GraphedTrainStep's LoRA preference: checked when made, a scoped choice that an explicit backend
    overrides and that ends with the block (CPU: Triton is never picked automatically)."""
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        GraphedTrainStep(lambda: None, lora_backend="tritn")
    assert isinstance(GraphedTrainStep(lambda: None, lora_backend=None).lora_preference(), contextlib.nullcontext)
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B, idx = torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.tensor([0, 1, 1])
    with L.prefer_backend("triton"):
        L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "reference"
    if L.available_backends("lora_linear", "cpu")["cpp"] == "ok":
        with L.prefer_backend("cpp"):
            with L.prefer_backend("reference"):
                L.lora_linear(x, W, None, A, B, idx, 1.0)
                assert L.last_backend["lora_linear"] == "reference"
            L.lora_linear(x, W, None, A, B, idx, 1.0)
            assert L.last_backend["lora_linear"] == "cpp"
            L.lora_linear(x, W, None, A, B, idx, 1.0, backend="reference")
            assert L.last_backend["lora_linear"] == "reference"
        monkeypatch.setenv("PPAP_FAST_LORA_CPP", "1")  # cpp first in the automatic order...
        with L.prefer_backend("reference"):  # ...the preferred one goes before it
            L.lora_linear(x, W, None, A, B, idx, 1.0)
            assert L.last_backend["lora_linear"] == "reference"
        L.lora_linear(x, W, None, A, B, idx, 1.0)
        assert L.last_backend["lora_linear"] == "cpp"
        monkeypatch.delenv("PPAP_FAST_LORA_CPP")
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "reference"
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        with L.prefer_backend("nope"):
            pass


def test_capture_after_warmup_order(monkeypatch):
    """Warm-up calls on a side stream that waits for the current one, the current stream waits for
    it, then one call under capture with the given pool (torch.cuda faked: the order is the test)."""
    from ppap_fast import train_graph as TG

    log = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits {other.name}")

    class FakeGraph:
        pass

    @contextlib.contextmanager
    def fake_stream(s):
        log.append(f"on {s.name}")
        yield
        log.append(f"off {s.name}")

    @contextlib.contextmanager
    def fake_graph(g, pool=None):
        log.append(f"capture pool={pool}")
        yield
        log.append("captured")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("current"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", fake_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    calls = iter(range(10))
    graph, out = TG.capture_after_warmup(lambda: log.append(f"step {next(calls)}") or len(log), 2, pool="P")
    assert isinstance(graph, FakeGraph) and out == 8
    assert log == ["side waits current", "on side", "step 0", "step 1", "off side", "current waits side",
                   "capture pool=P", "step 2", "captured"]

    # on another device than the current one: all of it with that device current (torch.cuda.graph
    # captures on a stream of the current device: cuda:0's, while the step's kernels went to cuda:1)
    @contextlib.contextmanager
    def fake_device(d):
        log.append(f"device {d}")
        yield
        log.append("device back")

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    log.clear()
    TG.capture_after_warmup(lambda: log.append("step") or 0, 1, device=torch.device("cuda", 1))
    assert log[0] == "device cuda:1" and log[-1] == "device back" and "captured" in log[:-1]


def test_arguments_and_reasons():
    with pytest.raises(ValueError, match="warmup"):
        GraphedTrainStep(lambda x: x, warmup=0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedTrainStep(lambda x: x)(torch.zeros(2))
    with pytest.raises(ValueError, match="input tensors .*got none"):  # was an IndexError
        GraphedTrainStep(lambda: None)()
    assert "CUDA device" in why_no_graph(torch.device("cpu"))
    if torch.cuda.is_available():
        assert why_no_graph(torch.device("cuda")) is None
        assert "DDP" in why_no_graph(torch.device("cuda"), distributed=True)


def _fake_cuda_capture(monkeypatch, capturing: list):
    """torch.cuda's streams, device and graph faked for CPU tensors; ``capturing`` is non-empty under capture."""
    class FakeStream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def fake_graph(g, pool=None):
        capturing.append(True)
        try:
            yield
        finally:
            capturing.pop()

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)


class _CpuGraphedTrainStep(GraphedTrainStep):
    """GraphedTrainStep without its CUDA-tensor check (CPU tests with torch.cuda faked)."""

    def _load(self, inputs):
        self.static = [x.detach().clone() for x in inputs]


def test_failed_capture_warns_once_and_trains_eagerly(monkeypatch):
    """A step that cannot be captured (a host sync under capture, faked on the CPU) raised at the first
    captured step, with no eager fallback (distill stopped there); now it warns once and that step and
    every later one run eagerly: the same losses and parameters as the eager steps."""
    capturing = []
    _fake_cuda_capture(monkeypatch, capturing)

    def train(graphed):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)

        def step(x, y):
            if capturing:  # as .item() under capture
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore text")
            loss = F.mse_loss(lin(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        run = _CpuGraphedTrainStep(step, warmup=2, lora_backend=None) if graphed else step
        gen = torch.Generator().manual_seed(1)
        losses = [run(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)).item() for _ in range(5)]
        return run, losses, [p.detach().clone() for p in lin.parameters()]

    _, l_e, p_e = train(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, l_g, p_g = train(True)
    msgs = [str(w.message) for w in caught]
    assert msgs == ["GraphedTrainStep: capturing the training step in a CUDA graph failed (RuntimeError: CUDA "
                    "error: operation not permitted when stream is capturing); training eagerly from now on"], msgs
    assert not run.captured and run.eager_steps == 2 and run.capture_error.startswith("RuntimeError")
    assert l_g == l_e and all(torch.equal(a, b) for a, b in zip(p_g, p_e))


def test_bad_inputs_and_warmup_are_named_in_one_line():
    """A non-tensor input after the first step raised AttributeError ('NoneType' object has no attribute 'shape'),
    warmup=2.5 ran as 2 and warmup='3' raised a TypeError; the CPU-tensor refusal named neither input nor fix."""
    for warmup in (2.5, "3", True):
        with pytest.raises(ValueError, match=r"^warmup must be an int >= 1 .*got " + re.escape(repr(warmup)) + "$"):
            GraphedTrainStep(lambda x: x, warmup=warmup)
    with pytest.raises(ValueError, match=r"^GraphedTrainStep takes CUDA tensors, got a tensor on cpu as input 0: .*"
                                         r"call the step function itself"):
        GraphedTrainStep(lambda x: x)(torch.zeros(2))
    step = GraphedTrainStep(lambda x: x.sum(), lora_backend=None)
    step.static = [torch.zeros(2)]  # as after a first step
    for bad in (None, 1.0):
        with pytest.raises(ValueError, match=rf"^input 0 is a {type(bad).__name__}; the captured step takes a tensor "
                                             r"\(2,\) torch.float32 on cpu \(static shapes\)$"):
            step._load([bad])


def test_why_no_graph_says_when_no_cuda_device_is_visible(monkeypatch):
    """With device cuda and no GPU visible it said 'needs a CUDA device (training runs on cuda)'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert why_no_graph(torch.device("cuda")) == ("CUDA-graph capture needs a CUDA device, and torch sees none here "
                                                  "(training asked for cuda)")
    assert why_no_graph(torch.device("cpu")) == "CUDA-graph capture needs a CUDA device (training runs on cpu)"


def _tiny_set(tmp_path, image_size=8):
    from ppap_fast.models.tiny import save_model

    torch.manual_seed(0)
    tfile = save_model(TinyResNet(widths=(4,), layers=(1,), in_channels=1, num_classes=3).eval(),
                       tmp_path / "t.safetensors")
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), num_images=8, shard_size=4, image_size=image_size, channels=1,
                                denoiser="random-conv", respacing="ddim5", seed=3, device="cpu",
                                teacher=f"tiny:{tfile}"), D.DistEnv())
    return data, f"tiny:{tfile}"


def test_distill_cuda_graph_on_cpu_warns_and_trains_eagerly(tmp_path):
    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "eager"), teacher, n_experts=2, r=2, alpha=2.0, steps=3,
                          batch_size=4, device="cpu")
    with warnings.catch_warnings():  # the default (cuda_graph=None): captured where it can, silently eager here
        warnings.simplefilter("error")
        D.distill(cfg, D.DistEnv())
    with pytest.warns(UserWarning, match="cuda_graph: CUDA-graph capture needs a CUDA device"):
        D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "g"), cuda_graph=True), D.DistEnv())
    import json

    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("eager", "g"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "g" / "train_summary.json").read_text())["cuda_graph"] is False


@requires_cuda
@pytest.mark.parametrize("layout", ["loralib", "factorised"])
def test_graphed_steps_equal_eager_steps(no_tf32, layout):
    """Eight steps of a routed ResNet bank with capturable AdamW: captured after 3, replayed after
    that, the same parameters and losses as eight eager steps (fp32, TF32 off). The factorised
    layout runs the multi-expert LoRA convs: Triton inside the graph, the automatic choice eagerly."""
    torch.manual_seed(0)
    net = TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=3, num_classes=5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 1000, (16,), generator=gen),
                torch.randn(16, 5, generator=gen)) for _ in range(8)]

    def train(graphed):
        torch.manual_seed(2)
        bank = ExpertBank(net, "resnet", n_experts=5, layout=layout).cuda().train()
        bank.check_inputs = False
        opt = torch.optim.AdamW(bank.parameters_to_train(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)

        def step(x, t, y):
            loss = F.mse_loss(bank(x, t), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        run = GraphedTrainStep(step) if graphed else step
        losses = []
        for i, (x, t, y) in enumerate(batches):
            opt.param_groups[0]["lr"].fill_(1e-2 * (1 - i / 8))
            losses.append(run(x.cuda(), t.cuda(), y.cuda()).item())
        if graphed:
            assert run.captured and run.eager_steps == 3
            if layout == "factorised":
                assert L.last_backend["lora_conv2d"] == "triton"
        return losses, {k: v.detach().clone() for k, v in bank.per_expert_state_dict().items()}

    (l_e, s_e), (l_g, s_g) = train(False), train(True)
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(l_e, l_g)), (l_e, l_g)
    for k in s_e:
        assert rel(s_g[k].double(), s_e[k].double()) < 1e-5, k


@requires_cuda
def test_distill_cuda_graph_matches_eager(tmp_path, no_tf32):
    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "eager"), teacher, n_experts=2, r=2, alpha=2.0, steps=8,
                          batch_size=4, device="cuda", cuda_graph=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        D.distill(cfg, D.DistEnv(device=torch.device("cuda", 0)))
        D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "g"), cuda_graph=None),  # the default
                  D.DistEnv(device=torch.device("cuda", 0)))
    assert not [w for w in caught if "cuda_graph" in str(w.message)]  # it was captured, not refused
    import json

    from safetensors.torch import load_file

    sa, sb = (json.loads((tmp_path / o / "train_summary.json").read_text()) for o in ("eager", "g"))
    assert sa["cuda_graph"] is False and sb["cuda_graph"] is True
    la, lb = sa["losses"], sb["losses"]
    assert len(la) == len(lb) == 8 and all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(la, lb))
    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("eager", "g"))
    assert all(rel(b[k].double(), a[k].double()) < 1e-4 for k in a if a[k].is_floating_point())


@requires_cuda
def test_distill_amp_bf16_cuda_graph_matches_eager(tmp_path, no_tf32):
    """amp="bf16" inside the captured step (autocast without its weight-cast cache) trains as eagerly."""
    from safetensors.torch import load_file

    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "eager"), teacher, n_experts=2, r=2, alpha=2.0, steps=6,
                          batch_size=4, device="cuda", cuda_graph=False, amp="bf16")
    env = D.DistEnv(device=torch.device("cuda", 0))
    D.distill(cfg, env)
    D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "g"), cuda_graph=True), env)
    sa, sb = (json.loads((tmp_path / o / "train_summary.json").read_text()) for o in ("eager", "g"))
    assert sb["cuda_graph"] is True and sa["amp"] == sb["amp"] == "bf16"
    # bf16 (8 bits of mantissa): the captured step may launch other LoRA kernels than the eager one
    assert all(math.isfinite(a) and abs(a - b) <= 2e-2 * max(1.0, abs(a)) for a, b in zip(sa["losses"], sb["losses"]))
    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("eager", "g"))
    assert all(rel(b[k].double(), a[k].double()) < 1e-2 for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("reduction", ["expert_mean", "batch_mean"])
def test_graphed_step_function_without_capture_trains_like_the_eager_path(tmp_path, monkeypatch, reduction):
    """The graph path's step (ExpertAdamW, or for batch_mean capturable AdamW, with a tensor learning
    rate, optimizer step inside the step function, no host input checks) run on the CPU without
    capture: the same experts as the eager path (5 experts at batch 4: some unsampled every step),
    and the bank that distill returns checks its inputs again."""
    import ppap_fast.train_graph as TG
    from safetensors.torch import load_file

    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "eager"), teacher, n_experts=5, r=2, alpha=2.0, steps=4,
                          batch_size=4, lr=1e-2, warmup=1, device="cpu", loss_reduction=reduction)
    D.distill(cfg, D.DistEnv())

    class Uncaptured:  # GraphedTrainStep's contract: step_fn(*inputs) does the whole step
        capture_error = None
        captured = True  # stands in for a captured graph in the summary

        def __init__(self, step_fn):
            self.step_fn = step_fn

        def __call__(self, *inputs):
            return self.step_fn(*inputs)

    class CpuAdamW(torch.optim.AdamW):  # capturable needs CUDA; the tensor lr stays
        def __init__(self, params, capturable=False, **kw):
            super().__init__(params, **kw)

    monkeypatch.setattr(TG, "why_no_graph", lambda *a, **k: None)
    monkeypatch.setattr(TG, "GraphedTrainStep", Uncaptured)
    monkeypatch.setattr(torch.optim, "AdamW", CpuAdamW)
    bank = D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "g")), D.DistEnv())
    assert json.loads((tmp_path / "g" / "train_summary.json").read_text())["cuda_graph"] is True
    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("eager", "g"))
    assert all(rel(b[k].double(), a[k].double()) < 1e-5 for k in a if a[k].is_floating_point())
    assert bank.check_inputs
    with pytest.raises(ValueError, match="out of range"):
        bank(torch.zeros(1, 1, 8, 8), torch.tensor([1000]))


def test_distill_whose_capture_fails_trains_eagerly(tmp_path, monkeypatch):
    """distill crashed at its first captured step when the capture failed; now it warns, trains on eagerly
    (the experts of the graph path's step run uncaptured) and its summary says it was not captured."""
    import ppap_fast.train_graph as TG
    from safetensors.torch import load_file

    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "eager"), teacher, n_experts=2, r=2, alpha=2.0, steps=5,
                          batch_size=4, lr=1e-2, warmup=1, device="cpu")
    D.distill(cfg, D.DistEnv())

    class CpuAdamW(torch.optim.AdamW):  # capturable needs CUDA; the tensor lr stays
        def __init__(self, params, capturable=False, **kw):
            super().__init__(params, **kw)

    capturing = []
    _fake_cuda_capture(monkeypatch, capturing)

    @contextlib.contextmanager
    def failing_graph(g, pool=None):
        raise RuntimeError("CUDA error: operation not supported")
        yield

    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(TG, "why_no_graph", lambda *a, **k: None)
    monkeypatch.setattr(TG, "GraphedTrainStep", _CpuGraphedTrainStep)
    monkeypatch.setattr(torch.optim, "AdamW", CpuAdamW)
    with pytest.warns(UserWarning, match=r"capturing the training step in a CUDA graph failed \(RuntimeError: CUDA "
                                         r"error: operation not supported\); training eagerly"):
        D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "g")), D.DistEnv())
    sa, sb = (json.loads((tmp_path / o / "train_summary.json").read_text()) for o in ("eager", "g"))
    assert sb["cuda_graph"] is False and len(sb["losses"]) == 5
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(sa["losses"], sb["losses"]))
    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("eager", "g"))
    assert all(rel(b[k].double(), a[k].double()) < 1e-5 for k in a if a[k].is_floating_point())


def test_distill_summary_says_no_graph_when_no_step_was_captured(tmp_path, monkeypatch):
    """steps <= the graph's warm-up: every step ran eagerly and nothing was captured; the summary said
    cuda_graph true."""
    import ppap_fast.train_graph as TG

    data, teacher = _tiny_set(tmp_path)

    class CpuAdamW(torch.optim.AdamW):  # capturable needs CUDA; the tensor lr stays
        def __init__(self, params, capturable=False, **kw):
            super().__init__(params, **kw)

    capturing = []
    _fake_cuda_capture(monkeypatch, capturing)
    made = []

    def graphed_step(step_fn):
        made.append(_CpuGraphedTrainStep(step_fn))
        return made[-1]

    monkeypatch.setattr(TG, "why_no_graph", lambda *a, **k: None)
    monkeypatch.setattr(TG, "GraphedTrainStep", graphed_step)
    monkeypatch.setattr(torch.optim, "AdamW", CpuAdamW)
    steps = GraphedTrainStep(lambda: None).warmup
    cfg = D.DistillConfig(str(data), str(tmp_path / "g"), teacher, n_experts=2, r=2, alpha=2.0, steps=steps,
                          batch_size=4, lr=1e-2, warmup=1, device="cpu")
    D.distill(cfg, D.DistEnv())
    summary = json.loads((tmp_path / "g" / "train_summary.json").read_text())
    assert len(made) == 1 and made[0].eager_steps == steps and made[0].capture_error is None  # the graph path ran
    assert summary["cuda_graph"] is False and len(summary["losses"]) == steps


def test_prefetched_batches_train_the_same_experts(tmp_path):
    """Batches made one step ahead on a thread: the same experts and losses as made in the loop
    (resume exactness with prefetching is tested in test_distributed)."""
    data, teacher = _tiny_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "p"), teacher, n_experts=2, r=2, alpha=2.0, steps=4,
                          batch_size=4, device="cpu")
    D.distill(cfg, D.DistEnv())
    D.distill(dataclasses.replace(cfg, out_dir=str(tmp_path / "n"), prefetch=False), D.DistEnv())
    import json

    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / o / "experts.safetensors")) for o in ("p", "n"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((tmp_path / o / "train_summary.json").read_text())["losses"] for o in ("p", "n"))
    assert la == lb


def test_batch_stream_order_state_and_errors():
    gen = torch.Generator().manual_seed(0)
    stream = D.BatchStream(lambda: torch.randint(0, 10**6, (2,), generator=gen), gen, 3)
    want_gen = torch.Generator().manual_seed(0)
    want = [torch.randint(0, 10**6, (2,), generator=want_gen) for _ in range(3)]
    got = [stream.take()]
    state = stream.generator_before_next().get_state()  # before batch 1, though batch 1 is made already
    got += [stream.take(), stream.take()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    again = torch.Generator()
    again.set_state(state)
    assert torch.equal(torch.randint(0, 10**6, (2,), generator=again), want[1])
    with pytest.raises(RuntimeError, match="no batch left"):
        stream.take()
    stream.close()

    def boom():
        raise OSError("disk")

    plain = D.BatchStream(lambda: 1, torch.Generator(), 1, prefetch=False)
    assert plain.take() == 1
    with pytest.raises(RuntimeError, match="no batch left"):
        plain.take()
    bad = D.BatchStream(boom, torch.Generator(), 2)
    with pytest.raises(OSError, match="disk"):  # the worker's error reaches the training loop
        bad.take()
    bad.close()


def test_verify_data_finds_a_flipped_byte_that_row_reads_do_not(tmp_path):
    """A byte flipped inside a shard's image data keeps the zip readable: row reads (no CRC) take the
    wrong value; ShardSet.verify and distill --verify-data name the file."""
    from ppap_fast.data import ShardSet
    from ppap_fast.data.shards import npz_members

    data, teacher = _tiny_set(tmp_path, image_size=48)  # members larger than zipfile's 4 KiB reads
    s = ShardSet(data)
    assert s.verify() == [] and len(s.files()) == 2
    m = npz_members(data / "shard_00001.npz")["images"]
    before = s.gather("images", [4])
    with open(m.path, "r+b") as f:  # first byte of shard 1's first image
        f.seek(m.offset)
        b = f.read(1)
        f.seek(m.offset)
        f.write(bytes([b[0] ^ 0xFF]))
    s = ShardSet(data)  # opens fine: directory and headers are intact
    assert not np.array_equal(s.gather("images", [4]), before)
    bad = s.verify()
    assert len(bad) == 1 and "shard_00001.npz" in bad[0] and "CRC-32" in bad[0]
    cfg = D.DistillConfig(str(data), str(tmp_path / "v"), teacher, n_experts=2, r=2, alpha=2.0, steps=1,
                          batch_size=4, device="cpu", verify_data=True)
    with pytest.raises(D.DistributedRunError, match="verifying the data set.*shard_00001.npz.*CRC-32"):
        D.distill(cfg, D.DistEnv())
    assert not (tmp_path / "v" / "experts.safetensors").exists()
    D.distill(dataclasses.replace(cfg, verify_data=False), D.DistEnv())  # without the check: trains on it
