"""kernels.layer_norm vs fp64: odd widths, several rows per program, strided rows, big offsets."""

import pytest
import torch

from kernels import platform
from kernels.layer_norm import layer_norm
from tolerances import DTYPES, assert_close, poison

DEV = "cpu" if platform.is_interpreter() else "cuda"


def _ref(x, w, b, eps):
    return torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), w.double(), b.double(), eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 40), (1, 77, 96), (3, 33, 320), (5, 1000)])
def test_layer_norm(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3 + 5).to(DEV, dtype)
    w = torch.randn(shape[-1], generator=gen).to(DEV, dtype)
    b = torch.randn(shape[-1], generator=gen).to(DEV, dtype)
    out = poison(shape, dtype, DEV)
    layer_norm(x, w, b, 1e-5, out=out)
    tr = torch.nn.functional.layer_norm(x.float(), (shape[-1],), w.float(), b.float(), 1e-5).to(dtype)
    assert_close(out, _ref(x, w, b, 1e-5), dtype, scale=2.0, torch_result=tr)


def test_strided_rows_and_no_affine():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2 * 48, generator=gen).to(DEV)[:, :48]  # row stride 96
    out = layer_norm(x, None, None, 1e-6)
    ref = torch.nn.functional.layer_norm(x.double(), (48,), eps=1e-6)
    assert_close(out, ref, torch.float32)
