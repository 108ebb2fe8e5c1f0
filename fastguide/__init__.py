"""fastguide: fast, tested classifier-free-guided diffusion sampling."""
from fastguide.guidance import CFG, ClassifierGuidance, ReCFG
from fastguide.sampler import Sampler, seeded_noise
from fastguide.schedule import NoiseSchedule
from fastguide.solvers import DDIM, DDPM, FlowEuler, Plan
from fastguide.table import RatioSums, RatioTable, accumulate_ratio_sums

__version__ = "0.1.0"
__all__ = ["CFG", "ClassifierGuidance", "DDIM", "DDPM", "FlowEuler", "NoiseSchedule", "Plan", "RatioSums",
           "RatioTable", "ReCFG", "Sampler", "accumulate_ratio_sums", "seeded_noise", "__version__"]
