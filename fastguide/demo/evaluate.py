"""Metrics for class-conditional digit samples against real held-out digits.

Per set of samples [N, 1, 8, 8] with requested labels [N]:

* ``accuracy``: fraction the evaluation classifier assigns to the requested label.
* ``expectation_shift``: mean over classes c of ||mean generated image of c - mean real image of c||_2
  (pixels in [-1, 1]; 64 pixels, so the largest possible value is 16).
* ``frechet_distance``: Frechet distance between Gaussians fitted to the classifier's penultimate features
  of the samples and of the real images (all classes pooled, as FID does).
* ``variance_ratio``: per class, total pixel variance of the generated images / that of the real images,
  averaged over classes (1 = the real spread; below 1 = collapsed, above 1 = more spread than real data).

``evaluate_samples(samples, labels)`` uses the shipped classifier and the held-out split; a
:class:`DigitsEvaluator` holds those (and the real features' statistics) for repeated calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from fastguide.demo.data import NUM_CLASSES

METRICS = ("accuracy", "expectation_shift", "frechet_distance", "variance_ratio")


def _check_pair(samples: torch.Tensor, labels: torch.Tensor, what: str = "samples", min_samples: int = 2) -> None:
    if not isinstance(samples, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{what}: expected tensors (images [N, C, H, W], labels [N])")
    if samples.ndim != 4:
        raise ValueError(f"{what}: expected images [N, C, H, W], got shape {tuple(samples.shape)}")
    if labels.ndim != 1 or labels.shape[0] != samples.shape[0]:
        raise ValueError(f"{what}: expected labels [N] with N = {samples.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"{what}: labels must be integers, got {labels.dtype}")
    if samples.shape[0] < min_samples:
        raise ValueError(f"{what}: need at least {min_samples} samples, got {samples.shape[0]}")


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64; unbiased covariance (N - 1)."""
    f = features.detach().double().cpu()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got shape {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(cov)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) for Gaussians N(mu1, C1), N(mu2, C2).

    tr((C1 C2)^(1/2)) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix
    C1^(1/2) C2 C1^(1/2), which has the same spectrum and avoids a non-symmetric matrix square root.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: inconsistent shapes mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return float(value.clamp(min=0))


def class_means(images: torch.Tensor, labels: torch.Tensor, classes) -> torch.Tensor:
    """[len(classes), *image] mean image per class."""
    flat = images.detach().double().cpu()
    labels = labels.cpu()
    return torch.stack([flat[labels == c].mean(0) for c in classes])


def expectation_shift(samples, labels, real_images, real_labels) -> float:
    """Mean over the requested classes of ||E[generated | c] - E[real | c]||_2 (over all pixels)."""
    classes = _shared_classes(labels, real_labels)
    diff = class_means(samples, labels, classes) - class_means(real_images, real_labels, classes)
    return float(diff.flatten(1).norm(dim=1).mean())


def variance_ratio(samples, labels, real_images, real_labels) -> float:
    """Mean over classes of (sum of per-pixel variances of generated images of c) / (same for real images of c)."""
    classes = _shared_classes(labels, real_labels)
    ratios = []
    for c in classes:
        gen = samples.detach().double().cpu()[labels.cpu() == c].flatten(1)
        real = real_images.detach().double().cpu()[real_labels.cpu() == c].flatten(1)
        if gen.shape[0] < 2:
            raise ValueError(f"samples: class {c} has {gen.shape[0]} sample(s); a variance needs at least 2")
        ratios.append(gen.var(0).sum() / real.var(0).sum())
    return float(torch.stack(ratios).mean())


def _shared_classes(labels, real_labels) -> list[int]:
    classes = sorted(set(labels.cpu().tolist()))
    missing = sorted(set(classes) - set(real_labels.cpu().tolist()))
    if missing:
        raise ValueError(f"labels: classes {missing} have no real reference images")
    return classes


class DigitsEvaluator:
    """The four metrics against a fixed reference set (default: the held-out split and the shipped classifier)."""

    def __init__(self, classifier=None, real_images=None, real_labels=None, device="cpu"):
        if classifier is None:
            from fastguide.demo.digits import load_digits_classifier

            classifier = load_digits_classifier(device=device)
        if real_images is None:
            from fastguide.demo.data import load_digits_split

            split = load_digits_split()
            real_images, real_labels = split.heldout_images, split.heldout_labels
        _check_pair(real_images, real_labels, "real_images")
        self.classifier, self.device = classifier, torch.device(device)
        self.real_images, self.real_labels = real_images.cpu().float(), real_labels.cpu().long()
        self.real_stats = gaussian_stats(self.features(self.real_images))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        out = [self.classifier.features(images[i:i + batch_size].to(self.device, torch.float32)).cpu()
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        out = [self.classifier(images[i:i + batch_size].to(self.device, torch.float32)).argmax(1).cpu()
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out)

    def sums(self, samples: torch.Tensor, labels: torch.Tensor) -> MetricSums:
        """The metrics' sufficient statistics of one part of a sample set (any size, one sample is fine)."""
        samples, labels = self._checked(samples, labels, min_samples=1)
        pixels = samples.double().flatten(1)
        onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).double()  # [N, K]
        feats = self.features(samples).double()
        correct = (self.predict(samples) == labels).double().sum()
        return MetricSums(onehot.sum(0), correct, onehot.T @ pixels, onehot.T @ pixels.square(), feats.sum(0),
                          feats.T @ feats)

    def empty_sums(self) -> MetricSums:
        """The sums of no samples (zeros of the right shapes)."""
        pixels, features = self.real_images[0].numel(), self.real_stats[0].numel()
        z = torch.zeros
        return MetricSums(z(NUM_CLASSES, dtype=torch.float64), z((), dtype=torch.float64),
                          z(NUM_CLASSES, pixels, dtype=torch.float64), z(NUM_CLASSES, pixels, dtype=torch.float64),
                          z(features, dtype=torch.float64), z(features, features, dtype=torch.float64))

    def from_sums(self, sums: MetricSums) -> dict:
        """The four metrics of the whole set whose :meth:`sums` (added over its parts) are ``sums``: equal to
        calling the evaluator on the whole set (up to float64 rounding)."""
        n = float(sums.count.sum())
        if n < 2:
            raise ValueError(f"sums: need at least 2 samples, got {n:g}")
        mu = sums.feature_sum / n
        cov = (sums.feature_outer - n * torch.outer(mu, mu)) / (n - 1)
        classes = [c for c in range(NUM_CLASSES) if sums.count[c] > 0]
        real = class_means(self.real_images, self.real_labels, _shared_classes(torch.tensor(classes), self.real_labels))
        k = sums.count[classes].view(-1, 1)
        gen_mean = sums.pixel_sum[classes] / k
        shift = float((gen_mean - real.flatten(1)).norm(dim=1).mean())
        ratios = []
        for j, c in enumerate(classes):
            if k[j] < 2:
                raise ValueError(f"samples: class {c} has {int(k[j])} sample(s); a variance needs at least 2")
            gen_var = (sums.pixel_square[c] - k[j] * gen_mean[j].square()) / (k[j] - 1)
            real_c = self.real_images.double()[self.real_labels == c].flatten(1)
            ratios.append(gen_var.sum() / real_c.var(0).sum())
        return {"accuracy": float(sums.correct / n), "expectation_shift": shift,
                "frechet_distance": frechet_distance(mu, cov, *self.real_stats),
                "variance_ratio": float(torch.stack(ratios).mean())}

    def _checked(self, samples, labels, min_samples: int = 2):
        _check_pair(samples, labels, min_samples=min_samples)
        samples, labels = samples.detach().cpu().float(), labels.cpu().long()
        if bool(((labels < 0) | (labels >= NUM_CLASSES)).any()):
            raise ValueError(f"labels: expected digits in [0, {NUM_CLASSES}), got {sorted(set(labels.tolist()))[:10]}")
        return samples, labels

    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        samples, labels = self._checked(samples, labels)
        mu, cov = gaussian_stats(self.features(samples))
        return {
            "accuracy": float((self.predict(samples) == labels).float().mean()),
            "expectation_shift": expectation_shift(samples, labels, self.real_images, self.real_labels),
            "frechet_distance": frechet_distance(mu, cov, *self.real_stats),
            "variance_ratio": variance_ratio(samples, labels, self.real_images, self.real_labels),
        }


@dataclass
class MetricSums:
    """Sufficient statistics of the four metrics over a set of samples (float64 sums), so a set split over
    processes is scored exactly as a whole: add the parts (or all-reduce them), then
    :meth:`DigitsEvaluator.from_sums`. ``count`` [K] and the per-pixel ``pixel_sum`` / ``pixel_square`` [K, P] are
    per class; ``feature_sum`` [F] / ``feature_outer`` [F, F] pool every class, as the Frechet distance does."""

    count: torch.Tensor
    correct: torch.Tensor
    pixel_sum: torch.Tensor
    pixel_square: torch.Tensor
    feature_sum: torch.Tensor
    feature_outer: torch.Tensor

    def __add__(self, other: "MetricSums") -> "MetricSums":
        return MetricSums(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> tuple:
        return (self.count, self.correct, self.pixel_sum, self.pixel_square, self.feature_sum, self.feature_outer)

    def vector(self) -> torch.Tensor:
        """Every sum in one float64 vector (:meth:`from_vector` undoes it)."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def from_vector(self, v: torch.Tensor) -> "MetricSums":
        """Sums shaped like these from a :meth:`vector`."""
        parts, at = [], 0
        for t in self.tensors():
            parts.append(v[at:at + t.numel()].reshape(t.shape))
            at += t.numel()
        return MetricSums(*parts)


def reduce_in_order(parts: dict[int, MetricSums], count: int, empty: MetricSums) -> MetricSums:
    """The sum of ``count`` parts numbered 0..count-1, held across the ranks of a torch.distributed group (each
    rank the ``parts`` it computed), added in number order, so the result is the same bits for any number of
    ranks: every rank fills its parts' rows of a [count, L] table of zeros, an all-reduce adds exact zeros to
    each row, and the rows are summed in order."""
    import torch.distributed as dist

    table = torch.zeros(count, empty.vector().numel(), dtype=torch.float64)
    for k, part in parts.items():
        table[k] = part.vector()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    total = empty.vector()
    for row in table:
        total = total + row
    return empty.from_vector(total)


@lru_cache(maxsize=1)
def default_evaluator() -> DigitsEvaluator:
    return DigitsEvaluator()


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor, evaluator: DigitsEvaluator | None = None) -> dict:
    """{"accuracy", "expectation_shift", "frechet_distance", "variance_ratio"} of digit samples [N, 1, 8, 8]
    generated for ``labels`` [N], against the held-out split (see the module docstring)."""
    return (evaluator or default_evaluator())(samples, labels)
