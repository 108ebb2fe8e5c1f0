import os

# The Triton interpreter must be chosen before any @triton.jit runs, so before fastguide.kernels is imported.
# On a CUDA machine set FASTGUIDE_TEST_CUDA=1 to run the same kernel tests on the GPU instead.
if not os.environ.get("FASTGUIDE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    yield
