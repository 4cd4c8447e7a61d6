"""Saliency map -> segmentation mask (seed 002: "use the saliency map to segment the object").

``threshold``: keep the top ``1 - percentile/100`` of the map. ``grabcut``: seed OpenCV's GrabCut with the map
(top 5 % sure foreground, top 30 % probable foreground, bottom 30 % sure background, rest probable
background) and let it refine the mask on the image's colours, as Simonyan et al. 2014 do.
"""

from __future__ import annotations

import logging

import numpy as np

from storage.errors import UsageError

__all__ = ["saliency_to_mask"]

log = logging.getLogger(__name__)


def saliency_to_mask(saliency: np.ndarray, method: str = "threshold", percentile: float = 80.0,
                     image: np.ndarray | None = None, iterations: int = 5) -> np.ndarray:
    """``(H,W)`` float map (higher = more salient) -> ``(H,W)`` bool foreground mask.

    ``image``: ``(H,W,3) uint8`` RGB, required for ``method='grabcut'``. When GrabCut cannot separate the
    seeds (e.g. a flat map), the threshold mask is returned and a warning logged.
    """
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.ndim != 2:
        raise UsageError(f"saliency must be a (H, W) map, got shape {sal.shape}")
    if not 0.0 <= percentile < 100.0:
        raise UsageError(f"percentile must be in [0, 100), got {percentile}")
    thr = np.percentile(sal, percentile)
    mask = sal >= thr if sal.max() > sal.min() else np.zeros_like(sal, dtype=bool)
    if method == "threshold":
        return mask
    if method != "grabcut":
        raise UsageError(f"method must be 'threshold' or 'grabcut', got {method!r}")
    if image is None or image.shape[:2] != sal.shape or image.ndim != 3 or image.dtype != np.uint8:
        raise UsageError("grabcut needs image= an (H, W, 3) uint8 RGB array of the map's size")
    import cv2

    gc = np.full(sal.shape, cv2.GC_PR_BGD, np.uint8)
    gc[sal >= np.percentile(sal, 70)] = cv2.GC_PR_FGD
    gc[sal >= np.percentile(sal, 95)] = cv2.GC_FGD
    gc[sal <= np.percentile(sal, 30)] = cv2.GC_BGD
    if not ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).any() or not ((gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)).any():
        log.warning("saliency_to_mask: map too flat for GrabCut; returning the threshold mask")
        return mask
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error as exc:
        log.warning("saliency_to_mask: GrabCut failed (%s); returning the threshold mask", str(exc)[:100])
        return mask
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
