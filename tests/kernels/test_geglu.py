"""kernels.geglu vs fp64 value·GELU_erf(gate) (value = first half, gate = second half)."""

import pytest
import torch

from kernels import platform
from kernels.geglu import geglu
from tolerances import DTYPES, assert_close, poison

DEV = "cpu" if platform.is_interpreter() else "cuda"


def _ref(x):
    v, g = x.double().chunk(2, dim=-1)
    return v * torch.nn.functional.gelu(g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 2 * 40), (1, 33, 2 * 1280), (3, 2 * 24)])
def test_geglu(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    x = (torch.randn(shape, generator=gen) * 2).to(DEV, dtype)
    out = poison((*shape[:-1], shape[-1] // 2), dtype, DEV)
    geglu(x, out=out)
    v, g = x.chunk(2, dim=-1)
    tr = v * torch.nn.functional.gelu(g)  # eager in this dtype: upstream's result
    assert_close(out, _ref(x), dtype, scale=2.0, torch_result=tr)


def test_geglu_matches_eager_fp16_bits_mostly():
    # same rounding points as eager: nearly every element identical in fp16
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2 * 320, generator=gen).to(DEV, torch.float16)
    v, g = x.chunk(2, dim=-1)
    eager = v * torch.nn.functional.gelu(g)
    same = (geglu(x) == eager).float().mean().item()
    assert same > 0.97, same
