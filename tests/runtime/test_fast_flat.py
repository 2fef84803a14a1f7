"""Fast mode's flat weights (runtime/fast/flat.py): one allocation per network, the qkv fusion's
weight as a view of it, and low-VRAM mode's parking of the ControlNet between samplings."""
import numpy as np
import pytest
import torch

import config
from kernels._fused import _adjacent_rows
from ldm.modules.attention import CrossAttention
from runtime import lowvram
from runtime.canny2image import Canny2Image
from runtime.fast import FastOptions, owner
from runtime.fast.flat import ALIGN, FlatWeights
from runtime.weights import build_model
from tests.conftest import TINY_CONFIG

PARAMS = dict(prompt="a box", a_prompt="best quality", n_prompt="lowres", num_samples=1,
              image_resolution=64, ddim_steps=2, guess_mode=False, strength=1.0, scale=9.0,
              seed=5, eta=0.0, low_threshold=100, high_threshold=200)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


@pytest.fixture(scope="module")
def image():
    g = np.random.default_rng(3)
    return (g.random((64, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture
def low_vram():
    yield lowvram.configure(low_vram=True)
    config.save_memory = False
    from cldm.hack import disable_sliced_attention
    disable_sliced_attention()


def test_flat_views_share_one_aligned_allocation_and_park():
    specs = [((3, 5), torch.float16, torch.contiguous_format),
             ((4, 3, 2, 2), torch.float32, torch.channels_last),
             ((7,), torch.bfloat16, torch.contiguous_format)]
    f = FlatWeights(specs, "cpu")
    views = f.views()
    base = f.flat.data_ptr()
    for v, (shape, dtype, fmt) in zip(views, specs):
        assert v.shape == shape and v.dtype == dtype and v.is_contiguous(memory_format=fmt)
        assert (v.data_ptr() - base) % ALIGN == 0
        assert v.untyped_storage().data_ptr() == base
    values = [torch.randn(s).to(d) for s, d, _ in specs]
    for v, x in zip(views, values):
        v.copy_(x)
    host = f.park()
    assert f.parked and f.flat is None
    for h, x in zip(host, values):
        assert torch.equal(h, x) and h.untyped_storage().data_ptr() == f.host.data_ptr()
    back, _ = f.unpark()
    assert not f.parked
    for b, x in zip(back, values):
        assert torch.equal(b, x) and b.untyped_storage().data_ptr() == f.flat.data_ptr()


def test_adjacent_rows_is_the_concatenation_without_a_copy():
    buf = torch.randn(3 * 4 * 6)
    ws = [buf[i * 24:(i + 1) * 24].view(4, 6) for i in range(3)]
    v = _adjacent_rows(ws)
    assert v.data_ptr() == ws[0].data_ptr() and torch.equal(v, torch.cat(ws, 0))
    assert _adjacent_rows([ws[0], ws[2], ws[1]]) is None                  # out of order
    assert _adjacent_rows([torch.randn(4, 6) for _ in range(3)]) is None   # own storages
    assert _adjacent_rows([ws[0], ws[1], ws[2].t().contiguous().t()]) is None


def test_fast_networks_are_flat_and_qkv_reads_them_in_place(model, image):
    """bf16 on the CPU (the conversion runs): UNet and ControlNet are views of one allocation
    each, every self-attention's q/k/v weights lie one above the other, the qkv fusion uses them
    without keeping a copy, and the images equal those of fast mode with the fusion off."""
    options = FastOptions.for_device("cpu", dtype="bf16", kernels=True, fusions=("qkv",))
    pipe = Canny2Image(model, mode="fast", options=options)
    try:
        fast = pipe.fast
        for name, net in (("unet", fast.unet), ("control", fast.control)):
            flat, where = fast.nets._flat[name]
            assert len(where) > 0.9 * len(list(net.parameters()))
            assert all(getattr(mod, k).untyped_storage().data_ptr() == flat.flat.data_ptr()
                       for mod, k, _ in where)
            attn1 = [m for n, m in net.named_modules() if isinstance(m, CrossAttention)
                     and n.endswith("attn1")]
            assert attn1
            for m in attn1:
                ws = (m.to_q.weight, m.to_k.weight, m.to_v.weight)
                assert _adjacent_rows(ws) is not None, name
        got = pipe.process(image, **PARAMS)
        assert fast.kernel_handle.counts["qkv"]["calls"] > 0
        assert not fast.kernel_handle._qkv_cache          # no concatenated copy kept
    finally:
        pipe.close()
    options = FastOptions.for_device("cpu", dtype="bf16", kernels=True, fusions=())
    pipe = Canny2Image(model, mode="fast", options=options)
    try:
        want = pipe.process(image, **PARAMS)
    finally:
        pipe.close()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_low_vram_parks_the_controlnet_between_samplings(model, image, low_vram, monkeypatch):
    """Under low-VRAM mode the ControlNet's fast weights leave their allocation for the decode
    and come back for the next sampling; the images stay those of fast mode without low-VRAM;
    when the allocation comes back at another address the graph cache is emptied (graphs would
    read stale memory), not when it comes back at the same one."""
    options = FastOptions.for_device("cpu", dtype="bf16")
    config.save_memory = False
    plain_pipe = Canny2Image(model, mode="fast", options=options)
    try:
        plain = plain_pipe.process(image, **PARAMS)
    finally:
        plain_pipe.close()
    config.save_memory = True
    pipe = Canny2Image(model, mode="fast", options=options)
    try:
        fast = pipe.fast
        flat, _ = fast.nets._flat["control"]
        w = fast.control.input_blocks[1][0].in_layers[2].weight
        assert w.untyped_storage().data_ptr() == flat.flat.data_ptr()
        seen = []
        decode = fast.decode

        def watched(z):
            seen.append((flat.parked, w.untyped_storage().data_ptr() == flat.host.data_ptr()))
            return decode(z)
        monkeypatch.setattr(fast, "decode", watched)
        first = pipe.process(image, **PARAMS)
        assert seen == [(True, True)] and flat.parked          # parked for the decode, and after
        assert not fast.nets._flat["unet"][0].parked           # the UNet never moves
        monkeypatch.setattr(FlatWeights, "unpark", lambda self, real=FlatWeights.unpark:
                            (real(self)[0], True))
        keys = list(fast.graph_keys())
        again = pipe.process(image, **PARAMS)
        assert list(fast.graph_keys()) == keys and seen[-1] == (True, True)
        monkeypatch.setattr(FlatWeights, "unpark", lambda self, real=FlatWeights.unpark:
                            (real(self)[0], False))
        cleared = []
        real_clear = fast.graphs.clear
        monkeypatch.setattr(fast.graphs, "clear", lambda: (cleared.append(1), real_clear()))
        third = pipe.process(image, **PARAMS)
        assert cleared == [1]
    finally:
        pipe.close()
    assert owner(model) is None
    for a, b, c, d in zip(plain, first, again, third):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, d)
