"""physlm: a physics-informed ResNet-BK language model, trained and reported reproducibly."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads that spin take the core from the thread doing the work; on a
# shared 2-core CPU that made a training step of many small operations 2x slower than
# the naive floor instead of 0.54x (benchmarks/README.md). Effective only when physlm is
# imported before torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def work_from_repo_root() -> None:
    """Make a notebook started in notebooks/ work from the repository root, where the
    parameters' relative paths (params/, runs/, reports/, data) are meant."""
    here = os.getcwd()
    if os.path.basename(here) == "notebooks" and os.path.isdir(os.path.join(here, "..", "physlm")):
        os.chdir("..")
