import cv2
import numpy as np
import pytest

from annotator.canny import CannyDetector
from annotator.util import HWC3, AnnotatorInputError, resize_image


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _image(rng, *shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# ---- HWC3 ---------------------------------------------------------------------------------------

def test_hwc3_rgb_is_returned_unchanged(rng):
    x = _image(rng, 5, 7, 3)
    assert HWC3(x) is x


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_hwc3_gray_is_repeated(rng, shape):
    x = _image(rng, *shape)
    y = HWC3(x)
    assert y.shape == (5, 7, 3) and y.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(y[:, :, c], x.reshape(5, 7))


def test_hwc3_rgba_composites_over_white_with_truncation(rng):
    x = _image(rng, 9, 11, 4)
    x[0, 0, 3], x[0, 1, 3] = 0, 255          # fully transparent and fully opaque pixels
    y = HWC3(x)
    rgb = x[:, :, :3].astype(np.float32)
    a = x[:, :, 3:].astype(np.float32) / np.float32(255.0)
    expected = np.clip(rgb * a + np.float32(255.0) * (np.float32(1.0) - a), 0, 255)
    np.testing.assert_array_equal(y, np.trunc(expected).astype(np.uint8))
    np.testing.assert_array_equal(y[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(y[0, 1], x[0, 1, :3])


def test_hwc3_truncates_rather_than_rounds():
    x = np.array([[[100, 0, 0, 128]]], np.uint8)       # 100*128/255 + 255*127/255 = 177.196...
    assert HWC3(x)[0, 0, 0] == 177
    x = np.array([[[1, 0, 0, 254]]], np.uint8)         # 0.996 + 1.0 = 1.996 -> 1
    assert HWC3(x)[0, 0, 0] == 1


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4, 3), np.uint16), "uint8"),
    (np.zeros((4, 4, 2), np.uint8), "channels"),
    (np.zeros((4, 4, 5), np.uint8), "channels"),
    (np.zeros((4,), np.uint8), "HxW"),
    (np.zeros((2, 4, 4, 3), np.uint8), "HxW"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 0), np.uint8), "empty"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_hwc3_rejects_bad_input_clearly(bad, message):
    with pytest.raises(AnnotatorInputError, match=message):
        HWC3(bad)
    assert issubclass(AnnotatorInputError, ValueError)


# ---- resize_image -------------------------------------------------------------------------------

def _expected_resize(img, resolution):
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    new_h = int(np.round(h * k / 64.0)) * 64
    new_w = int(np.round(w * k / 64.0)) * 64
    method = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(img, (new_w, new_h), interpolation=method)


@pytest.mark.parametrize("h, w, resolution, out_hw", [
    (564, 846, 512, (512, 768)),      # spec's example (down: area)
    (63, 65, 512, (512, 512)),        # up: Lanczos
    (1, 1, 64, (64, 64)),
    (1, 3, 64, (64, 192)),
    (513, 1025, 512, (512, 1024)),
    (512, 512, 512, (512, 512)),      # k == 1: area
    (480, 640, 512, (512, 704)),      # 682.67 -> 704
    (96, 160, 64, (64, 128)),         # 106.67/64 = 1.67 -> 2
    (64, 96, 64, (64, 128)),          # 96/64 = 1.5 -> 2 (half to even)
    (64, 160, 64, (64, 128)),         # 2.5 -> 2 (half to even, not 3)
    (64, 224, 64, (64, 256)),         # 3.5 -> 4
])
def test_resize_image_matches_cv2_and_spec(rng, h, w, resolution, out_hw):
    img = _image(rng, h, w, 3)
    out = resize_image(img, resolution)
    assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _expected_resize(img, resolution))


def test_resize_image_interpolation_choice(rng):
    img = _image(rng, 100, 130, 3)
    up = resize_image(img, 128)                          # k = 1.28 > 1
    np.testing.assert_array_equal(
        up, cv2.resize(img, (192, 128), interpolation=cv2.INTER_LANCZOS4))
    assert not np.array_equal(up, cv2.resize(img, (192, 128), interpolation=cv2.INTER_AREA))
    img = _image(rng, 300, 400, 3)
    down = resize_image(img, 256)
    np.testing.assert_array_equal(
        down, cv2.resize(img, (320, 256), interpolation=cv2.INTER_AREA))


def test_resize_image_rejects_bad_input(rng):
    with pytest.raises(AnnotatorInputError, match="uint8"):
        resize_image(np.zeros((8, 8, 3), np.float64), 64)
    with pytest.raises(AnnotatorInputError, match="round to 0"):
        resize_image(_image(rng, 100, 100, 3), 16)


# ---- Canny --------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(100, 200), (1, 255), (50, 60), (200, 100)])
def test_canny_on_rgb_equals_direct_cv2_call(rng, low, high):
    img = cv2.GaussianBlur(_image(rng, 67, 93, 3), (5, 5), 0)
    out = CannyDetector()(img, low, high)
    np.testing.assert_array_equal(out, cv2.Canny(img, low, high))
    assert out.shape == (67, 93) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255}


def test_canny_uses_rgb_not_gray(rng):
    img = cv2.GaussianBlur(_image(rng, 64, 64, 3), (3, 3), 0)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert not np.array_equal(CannyDetector()(img, 100, 200), cv2.Canny(gray, 100, 200))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "channels"),
    (np.zeros((8, 8, 4), np.uint8), "channels"),
    (np.zeros((8, 8, 6), np.uint8), "channels"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((8,), np.uint8), "HxW"),
])
def test_canny_rejects_bad_input_clearly(bad, message):
    with pytest.raises(AnnotatorInputError, match=message):
        CannyDetector()(bad, 100, 200)
