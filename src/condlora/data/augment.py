"""EDM's non-leaking augmentation (Karras et al. 2022, appendix B.2; transforms from Karras et al. 2020, ADA).

Each training image is augmented at random and the network is told how, through 9 augmentation labels in
its condition embedding; sampling passes zero labels, so augmentations do not leak into samples. The
transforms and labels are those of EDM's CIFAR-10 configuration:

    x-flip (w in {0, 1}, eligible always)           labels: w
    y-flip (w in {0, 1}, with probability p)        labels: w
    isotropic scaling s = 2^(0.2 w), w ~ N(0, 1)    labels: w
    rotation by w ~ U(-pi, pi)                      labels: cos w - 1, sin w
    anisotropic scaling 2^(+-0.2 w) along angle r   labels: w cos r, w sin r   (r = 0 half of the time)
    translation by (w_x, w_y) * 0.125 * size        labels: w_x, w_y

each geometric transform drawn independently with probability p, the label 0 when not applied. Geometric
transforms are one affine map per image, resampled bilinearly at twice the resolution and box-filtered back
(reflection at the borders); the published pipeline resamples through a sym6 wavelet filter instead, so
pixels differ slightly while the distribution of transforms and the labels are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9
SCALE_STD = 0.2  # log2 standard deviation of isotropic and anisotropic scaling
TRANSLATE_STD = 0.125  # standard deviation of translation, relative to the image size


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 2, 2) matrices [[cos, -sin], [sin, cos]]."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diagonal(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)


TRANSFORMS = ("xflip", "yflip", "scale", "rotate", "aniso", "translate")


class AugmentPipe:
    """Random geometric augmentation with labels, `pipe(images, generator) -> (augmented, labels)`.

    Args:
        p: probability of each transform (EDM uses 0.12 for CIFAR-10, 0.15 for FFHQ-64); p = 0 returns the
            images untouched with zero labels.
        transforms: the transforms that may be applied (all of EDM's by default); the others keep label 0.
    """

    def __init__(self, p: float, transforms: tuple[str, ...] = TRANSFORMS):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
        unknown = set(transforms) - set(TRANSFORMS)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}; expected some of {', '.join(TRANSFORMS)}")
        self.p, self.transforms = p, tuple(transforms)

    def _chosen(self, n: int, generator: torch.Generator, device: torch.device, probability: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < probability

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch (B, C, H, W); returns the images and their (B, 9) float32 labels."""
        n, _, h, w = images.shape
        dev = images.device

        def draw(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        def gauss(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=dev)

        def chosen(probability: float, transform: str = "") -> torch.Tensor:
            enabled = not transform or transform in self.transforms
            return self._chosen(n, generator, dev, probability if enabled else 0.0)

        xflip = (draw(n) < 0.5) & chosen(min(1.0, 1e8 * self.p), "xflip")  # EDM's multiplier 1e8: always eligible
        yflip = (draw(n) < 0.5) & chosen(self.p, "yflip")
        images = torch.where(xflip[:, None, None, None], images.flip(3), images)
        images = torch.where(yflip[:, None, None, None], images.flip(2), images)
        zero = torch.zeros(n, device=dev)
        scale_w = torch.where(chosen(self.p, "scale"), gauss(n), zero)
        angle = torch.where(chosen(self.p, "rotate"), (draw(n) * 2 - 1) * math.pi, zero)
        aniso_w = torch.where(chosen(self.p, "aniso"), gauss(n), zero)
        aniso_r = torch.where(chosen(0.5), (draw(n) * 2 - 1) * math.pi, zero)
        shift = torch.where(chosen(self.p, "translate")[None, :], gauss(2, n), zero[None, :])  # (2, B)

        # The forward map on pixel coordinates centred on the image (x right, y down): output = G(input) with
        # G = translate o aniso o rotate(-angle) o scale, the inverse of the published pipeline's G_inv.
        s = torch.exp2(scale_w * SCALE_STD)
        a = torch.exp2(aniso_w * SCALE_STD)
        linear = _rotation(-angle) @ _diagonal(s, s)
        linear = _rotation(-aniso_r) @ _diagonal(a, 1 / a) @ _rotation(aniso_r) @ linear
        offset = torch.stack([shift[0] * w * TRANSLATE_STD, shift[1] * h * TRANSLATE_STD], -1)  # (B, 2) pixels
        identity = (scale_w == 0) & (angle == 0) & (aniso_w == 0) & (shift == 0).all(0)
        warped = _warp(images, linear, offset)
        images = torch.where(identity[:, None, None, None], images, warped)  # untouched unless transformed
        labels = [xflip.float(), yflip.float(), scale_w, angle.cos() - 1, angle.sin()]
        labels += [aniso_w * aniso_r.cos(), aniso_w * aniso_r.sin(), shift[0], shift[1]]
        return images, torch.stack(labels, dim=1).float()


def _warp(images: torch.Tensor, linear: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """output(p) = input(G^-1 p) with G p = linear p + offset in centred pixel coordinates (y down), reflecting
    at the borders; sampled bilinearly on a 2x finer grid, then averaged over 2x2 blocks."""
    n, c, h, w = images.shape
    g = linear.double()
    g00, g01, g10, g11 = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
    det = g00 * g11 - g01 * g10  # G^-1 = [[g11, -g01], [-g10, g00]] / det, written out: no solver, no host check
    # normalised coordinates q = D p with D = diag(2/W, 2/H): input q = D G^-1 D^-1 (q_out - D offset),
    # and (D M D^-1)_ij = M_ij D_i / D_j
    theta_linear = torch.stack([g11, -g01 * (h / w), -g10 * (w / h), g00], dim=1).div(det[:, None]).view(n, 2, 2)
    theta_linear = theta_linear.to(images.dtype)
    shift = torch.stack([offset[:, 0] * (2 / w), offset[:, 1] * (2 / h)], dim=1)  # D offset
    theta_offset = -(theta_linear @ shift[..., None])[..., 0]
    theta = torch.cat([theta_linear, theta_offset[..., None]], dim=2)  # (B, 2, 3)
    grid = F.affine_grid(theta, [n, c, 2 * h, 2 * w], align_corners=False)
    fine = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return F.avg_pool2d(fine, 2)
