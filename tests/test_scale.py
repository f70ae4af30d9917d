"""The in-place gradient scaling kernel behind the fused losses' backward."""
import pytest
import torch

from lrkd_fast.kernels.scale import scale_
from tests.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_in_place_and_untouched_at_one(dtype):
    x = torch.randn(5000, device=DEVICE).to(dtype)
    ref = x.clone()
    scale_(x, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(x, ref)  # bit for bit: nothing was written
    scale_(x, torch.tensor([0.25], device=DEVICE))
    assert torch.equal(x, (ref.float() * 0.25).to(dtype))
    scale_(x, torch.tensor(0.0, device=DEVICE))
    assert not x.any()


def test_scale_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="contiguous"):
        scale_(torch.randn(4, 6, device=DEVICE).t(), torch.tensor(2.0, device=DEVICE))
    with pytest.raises(ValueError, match="factor must be one element"):
        scale_(torch.randn(4, device=DEVICE), torch.tensor([1.0, 2.0], device=DEVICE))
    assert scale_(torch.empty(0, device=DEVICE), torch.tensor(3.0, device=DEVICE)).numel() == 0
