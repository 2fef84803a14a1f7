"""Image helpers shared by the annotators (upstream's annotator/util.py, spec §4.9).

The array checks raise `AnnotatorInputError` (a ValueError) with a message a person can act on,
where upstream only asserted; valid inputs give bit-identical results.
"""
import cv2
import numpy as np


class AnnotatorInputError(ValueError):
    """An image the annotators cannot take (wrong dtype, shape or channel count)."""


def check_image(x, name="image", channels=(1, 3, 4)):
    """Raise AnnotatorInputError unless x is a non-empty uint8 HxW or HxWxC array, C in channels."""
    if not isinstance(x, np.ndarray):
        raise AnnotatorInputError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise AnnotatorInputError(f"{name} must be uint8 (0..255), got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise AnnotatorInputError(f"{name} must be HxW or HxWxC, got shape {x.shape}")
    if x.ndim == 3 and x.shape[2] not in channels:
        allowed = "/".join(str(c) for c in channels)
        raise AnnotatorInputError(f"{name} must have {allowed} channels, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AnnotatorInputError(f"{name} is empty (shape {x.shape})")


def HWC3(x):
    """Return x as uint8 HxWx3: gray is repeated, RGBA is composited over white (truncating)."""
    check_image(x)
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def resize_image(input_image, resolution):
    """Scale so the short side is about `resolution`, both sides rounded to multiples of 64.

    np.round rounds half to even; the aspect ratio may change slightly (846x564 at 512 -> 768x512).
    Upscaling uses Lanczos-4, downscaling and k == 1 use area interpolation, as upstream does.
    """
    check_image(input_image, "input_image")
    H, W = float(input_image.shape[0]), float(input_image.shape[1])
    k = float(resolution) / min(H, W)
    H = int(np.round(H * k / 64.0)) * 64
    W = int(np.round(W * k / 64.0)) * 64
    if H == 0 or W == 0:
        raise AnnotatorInputError(
            f"resolution {resolution} is too small for a {input_image.shape[0]}x"
            f"{input_image.shape[1]} image: a side would round to 0 px (use at least 64)")
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(input_image, (W, H), interpolation=interpolation)
