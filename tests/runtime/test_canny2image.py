"""Canny2Image.process on the tiny model (random weights) against the spec's steps (§4.10)."""
import random

import cv2
import numpy as np
import pytest
import torch

from annotator.util import HWC3, resize_image
from runtime.canny2image import Canny2Image
from runtime.errors import InputError
from runtime.seed import seed_everything
from tests.conftest import TINY_CONFIG

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = "lowres, bad anatomy"


@pytest.fixture(scope="module")
def model():
    from runtime.weights import build_model
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


@pytest.fixture(scope="module")
def pipe(model):
    return Canny2Image(model)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = np.full((80, 120, 3), 30, np.uint8)
    img[20:60, 30:90] = rng.integers(150, 256, size=(40, 60, 3), dtype=np.uint8)
    return img


def params(**overrides):
    p = dict(prompt="a box", a_prompt=A_PROMPT, n_prompt=N_PROMPT, num_samples=2,
             image_resolution=64, ddim_steps=1, guess_mode=False, strength=1.0, scale=9.0,
             seed=123, eta=0.0, low_threshold=100, high_threshold=200)
    p.update(overrides)
    return p


class Spy:
    """Records (cond, t) of every apply_model call, then calls the real one."""

    def __init__(self, model):
        self.model, self.calls, self.real = model, [], model.apply_model

    def __enter__(self):
        def apply_model(x, t, cond):
            self.calls.append((cond, t))
            return self.real(x, t, cond)
        self.model.apply_model = apply_model
        return self

    def __exit__(self, *exc):
        del self.model.apply_model


@pytest.fixture(scope="module")
def baseline(pipe, image):
    return pipe.process(image, **params())


def test_outputs_and_edge_map(baseline, image):
    out = baseline
    # 80x120 at 64: k = 0.8 -> 64 x round(1.5) * 64 = 64x128
    assert len(out) == 3
    for o in out:
        assert o.shape == (64, 128, 3) and o.dtype == np.uint8
    img = resize_image(HWC3(image), 64)
    edges = HWC3(cv2.Canny(img, 100, 200))
    np.testing.assert_array_equal(out[0], 255 - edges)
    assert out[0].min() == 0 and out[0].max() == 255
    assert not np.array_equal(out[1], out[2])      # two samples from different noise


def test_deterministic_for_a_fixed_seed(pipe, image, baseline):
    again = pipe.process(image, **params())
    for x, y in zip(baseline, again):
        np.testing.assert_array_equal(x, y)
    other = pipe.process(image, **params(seed=8, num_samples=1, ddim_steps=1))
    assert not np.array_equal(baseline[1], other[1])
    assert pipe.last_seed == 8


def test_equals_a_loop_written_from_the_spec(model, pipe, image):
    p = params(num_samples=1, ddim_steps=3, eta=0.5, scale=7.0, seed=4242)
    out = pipe.process(image, **p)

    # spec §4.10 steps 1-9 and §4.8, by hand (3 steps crash upstream: timesteps 1, 334, 667)
    with torch.no_grad():
        img = resize_image(HWC3(image), 64)
        detected = HWC3(cv2.Canny(img, 100, 200))
        control = torch.from_numpy(detected.copy()).float() / 255.0
        control = control[None].permute(0, 3, 1, 2)
        seed_everything(4242)
        c = {"c_concat": [control],
             "c_crossattn": [model.get_learned_conditioning(["a box, " + A_PROMPT])]}
        uc = {"c_concat": [control], "c_crossattn": [model.get_learned_conditioning([N_PROMPT])]}
        model.control_scales = [1.0] * 13
        ac = model.alphas_cumprod.float().cpu().numpy()
        ts = [1, 334, 667]
        x = torch.randn((1, 4, 8, 16))
        for index in (2, 1, 0):
            t = torch.full((1,), ts[index], dtype=torch.long)
            e_c = model.apply_model(x, t, c)
            e_u = model.apply_model(x, t, uc)
            e = e_u + 7.0 * (e_c - e_u)
            a_t = float(ac[ts[index]])
            a_prev = float(ac[ts[index - 1]] if index else ac[0])
            sigma = 0.5 * np.sqrt((1 - a_prev) * float(np.float32(1) / (np.float32(1) - ac[ts[index]]))
                                  * (1 - a_t / a_prev))
            f = [torch.full((1, 1, 1, 1), v) for v in
                 (a_t, a_prev, sigma, float(np.sqrt(np.float32(1) - ac[ts[index]])))]
            pred_x0 = (x - f[3] * e) / f[0].sqrt()
            x = f[1].sqrt() * pred_x0 + (1.0 - f[1] - f[2] ** 2).sqrt() * e + f[2] * torch.randn(x.shape)
        y = model.decode_first_stage(x)
        y = (y.permute(0, 2, 3, 1) * 127.5 + 127.5).numpy().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[0], 255 - detected)
    np.testing.assert_array_equal(out[1], y[0])


def test_guess_mode_scales_and_uncond_without_control(model, pipe, image):
    with Spy(model) as spy:
        pipe.process(image, **params(guess_mode=True, strength=0.5, ddim_steps=1))
    assert model.control_scales == [0.5 * 0.825 ** float(12 - i) for i in range(13)]
    assert len(spy.calls) == 2
    assert spy.calls[0][0]["c_concat"] is not None         # cond first, with control
    assert spy.calls[1][0]["c_concat"] is None             # uncond: no ControlNet
    with Spy(model) as spy:
        pipe.process(image, **params(strength=0.5, ddim_steps=1))
    assert model.control_scales == [0.5] * 13
    assert spy.calls[1][0]["c_concat"] is not None


def test_scale_one_makes_one_call_per_step(model, pipe, image):
    with Spy(model) as spy:
        pipe.process(image, **params(scale=1.0, ddim_steps=2, num_samples=1))
    assert len(spy.calls) == 2
    assert [int(t[0]) for _, t in spy.calls] == [501, 1]


def test_seed_minus_one_draws_from_python_random(pipe, image):
    random.seed(99)
    expected = random.Random(99).randint(0, 65535)
    steps = []
    pipe.process(image, **params(seed=-1, ddim_steps=1, num_samples=1),
                 progress=lambda i, n: steps.append((i, n)))
    assert pipe.last_seed == expected
    assert steps == [(1, 1)]


def test_input_conversions(pipe, image):
    p = params()
    check = lambda img: pipe.check(img, **p)[0]                             # noqa: E731
    assert check(image) is image
    wide = (image.astype(np.uint16) << 8) | 0xAB              # 16 bit: >> 8 gives image back
    converted = check(wide)
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, image)
    for ok in (image[:, :, 0], image[:, :, :1], np.dstack([image, image[:, :, :1]])):
        assert check(ok) is ok                                # HWC3 handles gray and RGBA
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    out = pipe.process(rgba, **params(num_samples=1, ddim_steps=1, seed=5))
    assert len(out) == 2 and out[1].shape == (64, 128, 3)


BAD = [
    (dict(input_image=np.zeros((64, 64, 3), np.float32)), "uint8 or uint16.*multiply by 255"),
    (dict(input_image=np.zeros((64, 64, 3), np.int32)), "uint8 or uint16"),
    (dict(input_image=np.zeros((64, 64, 2), np.uint8)), "1, 3 or 4 channels"),
    (dict(input_image=np.zeros((64, 64, 5), np.uint8)), "1, 3 or 4 channels"),
    (dict(input_image=np.zeros((0, 64, 3), np.uint8)), "empty"),
    (dict(input_image=np.zeros((64,), np.uint8)), "HxW"),
    (dict(input_image=None), "numpy array"),
    (dict(input_image=np.zeros((64, 64 * 200, 3), np.uint8)), "aspect ratio"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(n_prompt="x" * 10001), "too long"),
    (dict(num_samples=0), r"num_samples must be in 1\.\.32"),
    (dict(num_samples=33), r"num_samples must be in 1\.\.32"),
    (dict(num_samples=1.5), "num_samples must be an integer"),
    (dict(num_samples=True), "num_samples must be an integer"),
    (dict(image_resolution=32), r"image_resolution must be in 64\.\.2048"),
    (dict(image_resolution=4096), r"image_resolution must be in 64\.\.2048"),
    (dict(image_resolution=float("nan")), "image_resolution must be an integer"),
    (dict(ddim_steps=0), r"ddim_steps must be in 1\.\.1000"),
    (dict(ddim_steps="20"), "ddim_steps must be an integer"),
    (dict(guess_mode="yes"), "guess_mode must be True or False"),
    (dict(strength=-0.1), r"strength must be in 0\.0\.\.10"),
    (dict(strength=float("inf")), "strength must be a finite number"),
    (dict(scale=0.0), "scale must be > 0"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(seed=-2), "seed must be in -1"),
    (dict(seed=2 ** 32), "seed must be in -1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(eta=-1e-3), r"eta must be in 0\.0\.\.1"),
    (dict(eta=1.5), r"eta must be in 0\.0\.\.1"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(low_threshold=-1), "low_threshold must be in"),
    (dict(high_threshold=float("nan")), "high_threshold must be a finite number"),
    (dict(high_threshold="200"), "high_threshold must be a number"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_raise_input_error(model, pipe, image, bad, message):
    p = params()
    p.update(bad)
    img = p.pop("input_image", image)
    with Spy(model) as spy, pytest.raises(InputError, match=message):
        pipe.process(img, **p)
    assert not spy.calls                                   # rejected before any model work


def test_accepted_edge_values(pipe, image):
    # integral floats (some UI sliders send 512.0) and numpy ints become ints; low > high is
    # passed through (cv2.Canny swaps them, as upstream)
    checked = pipe.check(image, **params(num_samples=np.int64(2), image_resolution=64.0,
                                         ddim_steps=2.0, low_threshold=200, high_threshold=100))
    assert checked[4:7] == (2, 64, 2) and all(type(v) is int for v in checked[4:7])
    assert checked[-2:] == (200, 100)


def test_unknown_mode_is_refused(model):
    with pytest.raises(InputError, match="mode"):
        Canny2Image(model, mode="turbo")
