"""kernels.group_norm vs fp64: both paths (one pass / split), both layouts, odd group sizes,
fused SiLU, fused per-(sample, channel) pre-add, both upstream eps values, no-affine, big means."""

import pytest
import torch

from kernels import platform
from kernels.group_norm import group_norm
from tolerances import DTYPES, assert_close, poison, ref_group_norm

DEV = "cpu" if platform.is_interpreter() else "cuda"
ONE_PASS_MAX = platform.config("group_norm")["ONE_PASS_MAX"]


def _inputs(shape, dtype, seed, mean=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + mean).to(DEV, dtype)
    C = shape[1]
    w = (torch.rand(C, generator=gen) + 0.5).to(DEV, dtype)
    b = torch.randn(C, generator=gen).to(DEV, dtype)
    return x, w, b


def _check(x, G, w, b, eps, silu=False, add=None, channels_last=False):
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = poison(x.shape, x.dtype, DEV)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    group_norm(x, G, w, b, eps, silu=silu, add=add, out=out)
    ref = ref_group_norm(x, G, w, b, eps, silu=silu, add=add)
    # PyTorch's own result in this dtype (with upstream's rounding points) sets the error floor
    xt = x if add is None else (x + add[:, :, None, None]).to(x.dtype)
    tr = torch.nn.functional.group_norm(xt.float(), G, w.float(), b.float(), eps).to(x.dtype)
    if silu:
        tr = torch.nn.functional.silu(tr.float()).to(x.dtype)
    assert_close(out, ref, x.dtype, scale=2.0, torch_result=tr)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G", [
    ((2, 8, 5, 7), 4),        # one pass, odd spatial, group of 70
    ((1, 6, 9, 9), 2),        # group size 3 channels x 81
    ((2, 64, 12, 12), 32),    # upstream's 32 groups, 2 channels each
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_one_pass(dtype, shape, G, channels_last):
    x, w, b = _inputs(shape, dtype, seed=sum(shape) + G)
    _check(x, G, w, b, 1e-5, channels_last=channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_split_path_with_silu(dtype, channels_last):
    # groups larger than ONE_PASS_MAX: several splits, a ragged last split
    HW = 67
    C = 2 * (ONE_PASS_MAX // HW + 3)
    x, w, b = _inputs((1, C, 1, HW), dtype, seed=3)
    assert C // 2 * HW > ONE_PASS_MAX
    _check(x, 2, w, b, 1e-6, silu=True, channels_last=channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("big", [False, True], ids=["one_pass", "split"])
def test_fused_add_silu(dtype, big):
    # ResBlock out_layers: GN32(h + emb_out[:, :, None, None]) -> SiLU
    shape = (2, 4, 33, 70) if big else (2, 6, 5, 5)
    x, w, b = _inputs(shape, dtype, seed=9)
    add = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    _check(x, 2, w, b, 1e-5, silu=True, add=add)


def test_large_mean_small_variance():
    # mean 1000, std 2: E[x²]-E[x]² in fp32 would lose most digits of the variance
    x, w, b = _inputs((1, 4, 64, 80), torch.float32, seed=4, mean=1000.0)
    _check(x, 2, w, b, 1e-6)


def test_no_affine_and_3d_input():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 50, generator=gen).to(DEV)
    out = group_norm(x, 3, None, None, 1e-5)
    ref = torch.nn.functional.group_norm(x.double(), 3, eps=1e-5)
    assert_close(out, ref, torch.float32)


def test_rejects_strided_input():
    x = torch.randn(1, 4, 8, 8, device=DEV)[..., ::2]
    with pytest.raises(ValueError):
        group_norm(x, 2, None, None, 1e-5)
