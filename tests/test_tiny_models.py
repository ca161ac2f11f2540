"""The digits demo's tiny models (ppap_fast.models.tiny): input checks of the denoiser wrapper."""
import pytest
import torch

from ppap_fast.models.tiny import EpsModel


@pytest.fixture(scope="module")
def eps_model():
    torch.manual_seed(0)
    return EpsModel(block_out_channels=[8, 16, 16], norm_num_groups=4).eval()


def test_eps_model_timesteps_forms(eps_model):
    """An int, a float, a [1] and a [B] t give the same output; a [B'] or [B, 1] t was diffusers' broadcast error
    or AssertionError ('Timesteps should be a 1d-array'), now one line saying what is accepted."""
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = eps_model(x, torch.tensor([5, 5]))
        assert want.shape == (2, 1, 16, 16) and torch.isfinite(want).all()
        for t in (5, 5.0, torch.tensor(5), torch.tensor([5]), [5, 5]):
            torch.testing.assert_close(eps_model(x, t), want, rtol=0, atol=0)
        for bad in (torch.tensor([5, 5, 5]), torch.tensor([[5], [5]])):
            with pytest.raises(ValueError, match=r"^t must be one value or one per sample, shape \(2,\), got shape "):
                eps_model(x, bad)


def test_eps_model_input_shape_errors(eps_model):
    """A size the UNet cannot halve twice failed at a decoder concatenation ('Sizes of tensors must match'), a
    wrong channel count in the first conv, an empty batch in an attention reshape."""
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^x's spatial size \(17, 16\) must be divisible by 4 \(this UNet halves "
                                             r"it 2 times\): resize or pad x"):
            eps_model(torch.randn(2, 1, 17, 16), 5)
        with pytest.raises(ValueError, match=r"^x must be \[B, 1, H, W\], got shape \(2, 3, 16, 16\)"):
            eps_model(torch.randn(2, 3, 16, 16), 5)
        out = eps_model(torch.randn(2, 1, 20, 12), 5)
        assert out.shape == (2, 1, 20, 12) and torch.isfinite(out).all()
        empty = eps_model(torch.randn(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))
        assert empty.shape == (0, 1, 16, 16)
