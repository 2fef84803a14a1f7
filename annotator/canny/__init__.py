"""Canny edge detector (upstream's annotator/canny, spec §4.9): plain cv2.Canny with OpenCV's
defaults (aperture 3, L1 gradient). On a 3-channel image OpenCV takes, per pixel, the channel with
the largest gradient, which differs from Canny on a grayscale conversion; upstream feeds RGB.
Takes uint8 HxW, HxWx1 or HxWx3 (HWC3's output); RGBA is refused rather than letting the alpha
channel's gradient make edges (OpenCV would accept it).
"""
import cv2

from annotator.util import check_image


class CannyDetector:
    def __call__(self, img, low_threshold, high_threshold):
        check_image(img, "image", channels=(1, 3))
        return cv2.Canny(img, low_threshold, high_threshold)
