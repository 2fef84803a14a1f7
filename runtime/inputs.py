"""Input rules, defaults and limits of canny2image, in one place: the API (`Canny2Image`), the CLI,
the demo and the benchmarks all read them from here.

Every parameter is checked and bad ones raise InputError with a message a person can act on. The
checks reject only values upstream would crash on, or that make no sense; for every value they
accept the result is the one upstream computes. Ranges (UI range in brackets):
  num_samples      integer 1..32                     [1..12]   (memory: one latent per sample)
  image_resolution integer 64..2048                  [256..768] (a side must round to >= 64 px)
  ddim_steps       integer 1..1000                   [1..100]
  strength         finite 0..10                      [0..2]
  scale            finite, > 0 and <= 100            [0.1..30]
  eta              finite 0..1 (DDIM's range; above 1 the update can take sqrt of a negative)
  seed             integer -1..2**32-1 (-1 = random.randint(0, 65535), as upstream)
  low/high_threshold finite 0..2040 (the largest 3x3 Sobel L1 gradient) [1..255]; low > high is
                   allowed: cv2.Canny swaps them, as upstream would.
  prompts          str of at most 10000 characters (CLIP keeps 77 tokens anyway)
  input image      at most MAX_INPUT_PIXELS (50 MP), checked on the file's header before
                   decoding where the caller has a file (CLI, demo), else on the array
  resized image    each side at most 8192 px (a very long panorama would exhaust memory)
Integral floats (512.0, as some UI sliders send) are accepted where an integer is needed.

Input arrays (RGB order, as the Gradio UI gives): uint8 HxW, HxWx1, HxWx3 or HxWx4 (RGBA is
composited over white by HWC3, as upstream's process() does with an array). uint16 arrays are
reduced to uint8 by >> 8 (the high byte, the usual 16 -> 8 bit conversion). Float and other dtypes
are rejected: a float image may mean 0..1 or 0..255 and guessing would silently change the picture.

Image files are decoded by read_image(), the one reader of the CLI, the folder job, the demo and
the API. Its rule is that of upstream's demo (Gradio's gr.Image(type="numpy"), image_mode "RGB"):
PIL decodes the file, an EXIF orientation other than 1 is applied (the picture comes out upright),
then the image is converted to 8-bit RGB: alpha is dropped (not composited), palette, gray and
CMYK become RGB, 16-bit RGB(A) keeps the high byte (PIL's own reduction), an animation gives its
first frame. Where Gradio's conversion would destroy the picture this reader does not follow it:
16-bit gray is reduced by >> 8 like 16-bit colour (PIL's "RGB" conversion clips it at 255, nearly
all white), 32-bit float images are refused, and GIFs are converted like every other format
(Gradio 6 hands a GIF's palette indices through). Corrupt data is judged as PIL judges it: a file
PIL cannot decode (truncated, damaged compressed data) is refused with one line; a PNG whose only
fault is a wrong chunk CRC decodes (PIL does not check IDAT CRCs) and is accepted, as in the demo.
The size is checked on the header first (MAX_INPUT_PIXELS), and only regular files are opened (a
FIFO would block, a device never ends).
"""
import math
import numbers
import os
import warnings

import numpy as np

from ldm.util import special_file
from runtime.errors import InputError, first_line
from runtime.seed import MAX_SEED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FULL = os.path.join(REPO, "models", "cldm_v15.yaml")
CONFIG_TINY = os.path.join(REPO, "models", "cldm_tiny.yaml")

# Upstream's demo defaults (gradio_canny2image.py).
A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
            "cropped, worst quality, low quality")
DEFAULT_RESOLUTION, DEFAULT_STEPS = 512, 20
DEFAULT_STRENGTH, DEFAULT_SCALE, DEFAULT_ETA = 1.0, 9.0, 0.0
DEFAULT_LOW_THRESHOLD, DEFAULT_HIGH_THRESHOLD = 100, 200


def control_scales(strength, guess_mode):
    """The 13 ControlNet residual scales of upstream's process(): in guess mode they fall off
    geometrically from the middle block (0.825 ** (12 - i)), else all equal to strength."""
    if guess_mode:
        return [strength * (0.825 ** float(12 - i)) for i in range(13)]
    return [strength] * 13


MODES = ("reference", "fast")
MAX_SAMPLES = 32
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
MAX_STEPS = 1000
MAX_STRENGTH = 10.0
MAX_SCALE = 100.0
MAX_THRESHOLD = 2040.0
MAX_PROMPT_CHARS = 10000
MAX_SIDE = 8192
# 50 MP passes any ordinary photo (a 48 MP phone picture, 8K video frames) and keeps the decoded
# RGB copy under 150 MB. (A 1-bit PNG of 30000x30000 px is 109 KB on disk and 4.3 GB decoded.)
MAX_INPUT_PIXELS = 50_000_000
# The largest upload the demo takes: an uncompressed 8-bit RGB picture at the pixel limit (a 50 MP
# JPEG is ~25 MB; only uncompressed 16-bit colour files at the limit are larger).
MAX_UPLOAD_BYTES = 3 * MAX_INPUT_PIXELS


def check_pixels(width, height):
    """InputError if a width x height image is over MAX_INPUT_PIXELS (call it before decoding)."""
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"the image is too large: {width}x{height} = {width * height:,} pixels, more than "
            f"the {MAX_INPUT_PIXELS:,} ({MAX_INPUT_PIXELS / 1e6:.0f} megapixels) allowed; "
            f"downscale it first (it is resized to image_resolution anyway)")


def read_image(path):
    """Decode an image file into what the pipeline takes: uint8 HxWx3 RGB, by the rule in this
    module's docstring (upstream's demo's). Every failure is an InputError in one line (without
    the path: callers name the file their own way)."""
    import PIL.Image
    try:
        kind = special_file(path)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as e:
        raise InputError(f"cannot read the file ({e.strerror or e})") from None
    if kind is not None:
        raise InputError(f"{kind}, not an image file")
    try:
        with warnings.catch_warnings():     # PIL warns from 89 MP on: refused from 50 MP on
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError:
        raise InputError(f"the image is too large (over {2 * PIL.Image.MAX_IMAGE_PIXELS / 1e6:.0f}"
                         f" megapixels); downscale it first") from None
    except PIL.UnidentifiedImageError:
        raise InputError("not an image that can be read (use PNG or JPEG)") from None
    except OSError as e:
        raise InputError(f"cannot read the file ({e.strerror or e})") from None
    with image:
        return pil_to_array(image)


def pil_to_array(image):
    """A PIL image (opened, not yet decoded) -> uint8 HxWx3 RGB by read_image's rule, or
    InputError in one line. The size is checked before anything is decoded."""
    check_pixels(*image.size)
    if image.mode == "F":
        raise InputError("32-bit float images are not supported: save it as an 8- or 16-bit "
                         "PNG, or a JPEG")
    try:
        return _to_rgb8(image)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"the image data is truncated or corrupt ({first_line(e)}); "
                         f"re-save it as PNG or JPEG") from None


def _to_rgb8(image):
    """Upright (EXIF), then 8-bit RGB: Gradio's steps, 16-bit gray by its high byte."""
    import PIL.ImageOps
    if image.getexif().get(0x0112, 1) != 1:         # 274: Orientation; 1 is upright
        image.load()                                 # decoding errors: the caller's message
        try:
            image = PIL.ImageOps.exif_transpose(image)
        except Exception:                            # a broken EXIF block: as Gradio, unrotated
            pass
    if image.mode.startswith("I"):                   # "I;16", "I;16B", "I": 16- or 32-bit gray
        gray = (np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _integer(name, value, low, high):
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or not float(value).is_integer():
            raise InputError(f"{name} must be an integer, got {value!r}")
    elif not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise InputError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _real(name, value, low, high, low_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bound = f"> {low} and <= {high}" if low_open else f"in {low}..{high}"
        raise InputError(f"{name} must be {bound}, got {value}")
    return value


def _text(name, value):
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{name} is too long: {len(value)} characters (at most {MAX_PROMPT_CHARS})")
    return value


def to_uint8_image(image):
    """Check an input image and return it as uint8 HxW or HxWxC (C in 1, 3, 4)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"input_image must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise InputError(f"input_image must be HxW or HxWxC, got shape {image.shape}")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InputError(
            f"input_image must have 1, 3 or 4 channels (gray, RGB, RGBA), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"input_image is empty (shape {image.shape})")
    check_pixels(image.shape[1], image.shape[0])
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        hint = " (multiply by 255 and round first if it is 0..1)" if image.dtype.kind == "f" else ""
        raise InputError(f"input_image must be uint8 or uint16, got {image.dtype}{hint}")
    return image


def resized_shape(height, width, resolution):
    """(H, W) that resize_image will produce, for checking before any work is done."""
    k = float(resolution) / min(float(height), float(width))
    return (int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64)


def check_inputs(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                 ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold):
    """Validate all parameters; return them normalized (or raise InputError)."""
    image = to_uint8_image(input_image)
    prompt, a_prompt, n_prompt = (_text(n, v) for n, v in
                                  (("prompt", prompt), ("a_prompt", a_prompt),
                                   ("n_prompt", n_prompt)))
    num_samples = _integer("num_samples", num_samples, 1, MAX_SAMPLES)
    image_resolution = _integer("image_resolution", image_resolution,
                                MIN_RESOLUTION, MAX_RESOLUTION)
    ddim_steps = _integer("ddim_steps", ddim_steps, 1, MAX_STEPS)
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise InputError(f"guess_mode must be True or False, got {guess_mode!r}")
    strength = _real("strength", strength, 0.0, MAX_STRENGTH)
    scale = _real("scale", scale, 0.0, MAX_SCALE, low_open=True)
    seed = _integer("seed", seed, -1, MAX_SEED)
    eta = _real("eta", eta, 0.0, 1.0)
    low_threshold = _real("low_threshold", low_threshold, 0.0, MAX_THRESHOLD)
    high_threshold = _real("high_threshold", high_threshold, 0.0, MAX_THRESHOLD)
    h, w = resized_shape(image.shape[0], image.shape[1], image_resolution)
    if max(h, w) > MAX_SIDE:
        raise InputError(
            f"the image would be resized to {w}x{h}: its aspect ratio is too extreme "
            f"(each side at most {MAX_SIDE} px); crop it or lower image_resolution")
    return (image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
            bool(guess_mode), strength, scale, seed, eta, low_threshold, high_threshold)
