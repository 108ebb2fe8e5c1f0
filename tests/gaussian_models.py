"""Models with a known answer for solver parity tests (imported by test modules; pytest puts tests/ on the path):
the exact eps of per-element Gaussian data, so samples stay O(1) as a trained model's do."""
import torch

SHAPE, NULL = (2, 3, 5), 5
_gen = torch.Generator().manual_seed(1)
MEANS = torch.randn(NULL + 1, *SHAPE, generator=_gen, dtype=torch.float64) * 0.5


def gaussian_eps(abar):
    """eps of data N(MEANS[c], 0.3^2) at a (possibly fractional) training index t, abar interpolated linearly,
    plus a small nonlinearity."""
    def model(x, t, c):
        lo = t.floor().long().clamp(max=len(abar) - 2)
        w = (t - lo).view(-1, 1, 1, 1).to(x.dtype)
        a2 = (abar[lo].view(-1, 1, 1, 1) * (1 - w) + abar[lo + 1].view(-1, 1, 1, 1) * w).to(x.dtype)
        a, s = a2.sqrt(), (1 - a2).sqrt()
        return s * (x - a * MEANS[c].to(x.dtype)) / (a2 * 0.09 + s * s) + 0.05 * torch.tanh(x.roll(1, 1))
    return model
