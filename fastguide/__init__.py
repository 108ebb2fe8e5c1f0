"""fastguide: fast, tested classifier-free-guided diffusion sampling."""
from fastguide.diffusers_schedulers import solver_from_diffusers
from fastguide.edm import EDM
from fastguide.euler import Euler
from fastguide.guidance import APG, CFG, CFGZeroStar, ClassifierGuidance, GuideNetwork, NoGuidance, ReCFG
from fastguide.heun import Heun
from fastguide.lcm import LCM
from fastguide.multistep import DPMSolver, UniPC
from fastguide.pndm import PLMS
from fastguide.noise import seeded_noise, step_noise
from fastguide.sampler import Sampler
from fastguide.schedule import FlowSchedule, NoiseSchedule
from fastguide.solvers import DDIM, DDPM, FlowEuler, Plan
from fastguide.table import RatioTable
from fastguide.table_build import RatioSums, accumulate_ratio_sums

__version__ = "0.1.0"
__all__ = ["APG", "CFG", "CFGZeroStar", "ClassifierGuidance", "DDIM", "DDPM", "DPMSolver", "EDM", "Euler", "FlowEuler", "FlowSchedule", "GuideNetwork", "Heun", "LCM", "NoGuidance",
           "NoiseSchedule", "PLMS", "Plan", "RatioSums", "RatioTable", "ReCFG", "Sampler", "UniPC", "__version__",
           "accumulate_ratio_sums", "seeded_noise", "solver_from_diffusers", "step_noise"]
