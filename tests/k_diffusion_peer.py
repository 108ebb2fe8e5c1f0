"""k-diffusion (Katherine Crowson's reference sampler implementations) as a test peer: its ``sampling`` and
``external`` modules, imported from the installed k-diffusion without running the package ``__init__`` (the
package stays in ``sys.modules`` as a bare module holding just the submodules imported).

The package ``__init__`` imports every k-diffusion module (models, training, evaluation: torchvision, CLIP,
wandb, ...), and its wheel depends on all of that, so the tests install it with ``--no-deps`` and load only
what they use: ``sampling.py`` (scipy, torchdiffeq, torchsde, tqdm and ``utils.append_dims``), ``utils.py``
(torch, PIL, safetensors) and ``external.py`` (torch, ``sampling`` and ``utils``). ``utils.py`` imports
torchvision at the top, for image helpers (``from_pil_image`` / ``to_pil_image``) the tests never call: where
torchvision is not importable, a stub ``torchvision.transforms.functional`` stands in for the duration of that
import only (it raises if anything reads from it) and is taken out of ``sys.modules`` afterwards.

A missing k-diffusion is an error, not a skip: the solvers' k-diffusion tests are core tests.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager

K_DIFFUSION_VERSION = "0.1.1.post1"
# the README's test command
INSTALL = (f'pip install -e ".[test]" && pip install --no-deps "k-diffusion=={K_DIFFUSION_VERSION}" '
           "&& python -m pytest -q")
_TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@functools.lru_cache(maxsize=None)
def load_k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external) of the installed k-diffusion; ImportError (with the README's
    install command) if it is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"k-diffusion is not installed: the sampler tests compare against it. Install the test "
                          f"set-up as the README does: {INSTALL}")
    if "k_diffusion" not in sys.modules:
        # a bare package: its submodules import relative to it, but its __init__ (everything else) never runs
        bare = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
        bare.submodule_search_locations = list(spec.submodule_search_locations)
        package = importlib.util.module_from_spec(bare)
        package.__doc__ = "k-diffusion's package, bare (loaded by tests/k_diffusion_peer.py without its __init__)"
        sys.modules["k_diffusion"] = package
    with _torchvision_if_missing():
        importlib.import_module("k_diffusion.utils")
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


@contextmanager
def _torchvision_if_missing():
    """The real torchvision if it imports; otherwise stub modules in ``sys.modules`` while the block runs."""
    before = {name: sys.modules[name] for name in _TORCHVISION if name in sys.modules}
    try:
        importlib.import_module("torchvision.transforms.functional")
        real = True
    except Exception:  # not installed, or built for another torch (its C++ ops fail to register)
        real = False
        for name in list(sys.modules):
            if (name == "torchvision" or name.startswith("torchvision.")) and name not in before:
                del sys.modules[name]
    if real:
        yield
        return
    stubs = {name: types.ModuleType(name) for name in _TORCHVISION}
    for name in _TORCHVISION[:2]:
        stubs[name].__path__ = []

    def missing(attr):
        raise AttributeError(f"torchvision.transforms.functional.{attr}: torchvision is not installed (this stub only "
                             "lets k_diffusion.utils import; its image helpers are not available)")

    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    stubs["torchvision.transforms.functional"].__getattr__ = missing
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in _TORCHVISION:
            if name in before:
                sys.modules[name] = before[name]
            else:
                sys.modules.pop(name, None)
