"""kernels.activations vs fp64: SiLU, the VAE's x·sigmoid(x), CLIP's quick-GELU; both layouts."""

import pytest
import torch

from kernels import platform
from kernels.activations import activation
from tolerances import DTYPES, assert_close, poison

DEV = "cpu" if platform.is_interpreter() else "cuda"
ALPHA = {"silu": 1.0, "swish": 1.0, "quick_gelu": 1.702}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["silu", "swish", "quick_gelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_activation(dtype, mode, channels_last):
    gen = torch.Generator().manual_seed(len(mode))
    x = (torch.randn(2, 5, 9, 11, generator=gen) * 4).to(DEV, dtype)
    out = poison(x.shape, dtype, DEV)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        out = out.to(memory_format=torch.channels_last)
    activation(x, mode, out=out)
    xd = x.double()
    ref = xd * torch.sigmoid(ALPHA[mode] * xd)
    eager = x * torch.sigmoid(ALPHA[mode] * x) if mode != "silu" else torch.nn.functional.silu(x)
    assert_close(out, ref, dtype, scale=2.0, torch_result=eager)
    if dtype == torch.float16:  # same rounding points as the eager expression
        assert (out == eager).float().mean().item() > 0.98
