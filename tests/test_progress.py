"""Training progress bars show the loss, read from the device at most once per update interval."""
import math

import pytest
import torch

from ppap_fast.progress import BarLoss


class FakeBar:
    def __init__(self):
        self.postfixes = []

    def set_postfix(self, refresh=True, **kw):
        self.postfixes.append(kw)


def test_bar_shows_the_mean_of_the_steps_since_its_last_update(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("ppap_fast.progress.time.monotonic", lambda: clock[0])
    bar = FakeBar()
    shown = BarLoss(bar, every_s=2.0)
    shown.add(torch.tensor(4.0))  # the first step is shown at once
    for v, now in ((1.0, 0.5), (2.0, 1.0), (6.0, 2.5), (5.0, 3.0)):
        clock[0] = now
        shown.add(torch.tensor(v))
    assert bar.postfixes == [{"loss": "4"}, {"loss": "3"}]  # (1 + 2 + 6) / 3 at 2.5 s; 5.0 still pending
    clock[0] = 4.6
    shown.add(7.0)  # a float (the DDP loop's already-read loss)
    assert bar.postfixes[-1] == {"loss": "6"} and not shown.pending


def test_without_a_bar_nothing_is_kept_or_read():
    shown = BarLoss(range(3))
    shown.add(torch.tensor(math.nan))
    assert shown.bar is None and not shown.pending


@pytest.mark.parametrize("trainer", ["distill", "train_classifier"])
def test_trainers_show_their_loss_on_the_bar(monkeypatch, tmp_path, trainer):
    """distill_ppap / train_classifier put the running loss on their progress bar (one update per interval)."""
    import tqdm

    from ppap_fast import distill
    from ppap_fast.demo import WEIGHTS_DIR
    from ppap_fast.finetune import train_classifier
    from ppap_fast.models.tiny import TinyResNet, load_model

    seen = []
    real = tqdm.tqdm

    class Recording(real):
        def set_postfix(self, *a, **kw):
            seen.append(kw)
            return super().set_postfix(*a, **kw)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    torch.manual_seed(0)
    if trainer == "distill":
        import numpy as np

        from ppap_fast.data import ShardWriter

        rng = np.random.default_rng(0)
        out = tmp_path / "set"
        w = ShardWriter(out, 8, 8)
        w.run(lambda k: {"images": rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8),
                         "logits": rng.standard_normal((8, 10)).astype(np.float32)})
        teacher = load_model(WEIGHTS_DIR / "classifier.safetensors")
        distill.distill_ppap(teacher, out, n_experts=2, steps=3, batch_size=4, progress=True)
    else:
        x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
        train_classifier(TinyResNet(), x, y, steps=3, batch_size=4, progress=True)
    assert seen and all(math.isfinite(float(kw["loss"])) for kw in seen), seen
