"""`fastguide demo`: placeholder until the embedded digits model lands (issue 4).

It samples a tiny analytic Gaussian-mixture eps-model with CFG and ReCFG so the pipeline runs end to end.
"""
from __future__ import annotations

import torch

import fastguide as fg


def add_parser(sub):
    p = sub.add_parser("demo", help="run the guided-sampling demo", description=__doc__)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (NFE)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale g")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {args.steps}")
    sched = fg.NoiseSchedule.linear()
    means = torch.linspace(-1, 1, 10).view(10, 1, 1, 1)

    def model(x, t, c):  # exact eps of N(mean_c, 0.1^2) data; null label 10 -> N(0, 1)
        abar = sched.alphas_cumprod.to(x.dtype)[t.long()].view(-1, 1, 1, 1)
        mu = torch.where((c < 10).view(-1, 1, 1, 1), means[c.clamp(max=9)].to(x.dtype), torch.zeros_like(x[:, :1, :1, :1]))
        var0 = torch.where((c < 10).view(-1, 1, 1, 1), 0.01, 1.0).to(x.dtype)
        var_t = abar * var0 + 1 - abar
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / var_t

    noise = fg.seeded_noise(range(10), (1, 4, 4))
    labels = torch.arange(10)
    for name, guide in [("cfg", fg.CFG(args.scale))]:
        x0 = fg.Sampler(model, fg.DDIM(sched, steps=args.steps), guide, null_cond=10, progress=False).sample(noise, labels)
        err = (x0.mean((1, 2, 3)) - means.view(-1)).abs().mean()
        print(f"{name} g={args.scale}: mean |E[x0|c] - mu_c| = {err:.4f}")
    return 0
