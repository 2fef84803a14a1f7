"""The CLI's built-in input: a deterministic synthetic picture of a house, drawn with OpenCV.

No downloaded data: the picture is made from flat shapes with sharp borders, so Canny finds clear
edges at the default thresholds (100/200).
"""
import cv2
import numpy as np

SAMPLE_PROMPT = "a house, best quality"
SAMPLE_NAME = "sample_house"


def sample_image(width=640, height=480):
    """Return an RGB uint8 HxWx3 picture of a house under a sun; the same bytes on every call."""
    if width < 64 or height < 64:
        raise ValueError(f"sample image must be at least 64x64, got {width}x{height}")
    sx, sy = width / 640.0, height / 480.0

    def pt(x, y):
        return int(round(x * sx)), int(round(y * sy))

    img = np.empty((height, width, 3), np.uint8)
    img[:] = (135, 190, 235)                                          # sky
    ground_top = pt(0, 360)[1]
    img[ground_top:] = (70, 150, 60)                                  # grass
    cv2.circle(img, pt(540, 80), int(45 * min(sx, sy)), (250, 215, 60), -1)        # sun
    cv2.rectangle(img, pt(170, 220), pt(430, 380), (200, 90, 70), -1)             # walls
    roof = np.array([pt(140, 225), pt(300, 110), pt(460, 225)], np.int32)
    cv2.fillPoly(img, [roof], (110, 50, 40))                                       # roof
    cv2.rectangle(img, pt(275, 285), pt(325, 380), (90, 60, 30), -1)             # door
    for x0 in (195, 355):                                                          # windows
        cv2.rectangle(img, pt(x0, 250), pt(x0 + 50, 300), (240, 240, 255), -1)
        cv2.line(img, pt(x0 + 25, 250), pt(x0 + 25, 300), (60, 60, 60), max(1, int(3 * sx)))
        cv2.line(img, pt(x0, 275), pt(x0 + 50, 275), (60, 60, 60), max(1, int(3 * sy)))
    cv2.rectangle(img, pt(370, 130), pt(400, 185), (120, 120, 120), -1)           # chimney
    cv2.fillPoly(img, [roof], (110, 50, 40))   # roof over the chimney's foot
    return img
