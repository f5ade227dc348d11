"""physlm: a physics-informed ResNet-BK language model, trained and reported reproducibly."""

import os

__version__ = "0.1.0"

# The package's layers, lowest first: a module imports only modules of its own layer or of
# a layer below (and no two modules import each other, even through others). Nothing here
# imports from outside the package (benchmarks/ uses physlm, never the other way round).
# tests/test_layers.py holds the code to this table.
LAYERS = (
    ("foundation", ("errors", "values", "files", "text")),          # no torch
    ("settings", ("sections", "config")),
    ("numerics", ("distributed", "triton_complex", "bk_triton", "scan_triton", "bk_core",
                  "bk_features", "losses", "moe", "koopman", "metrics", "gradients", "fixture",
                  "optim")),
    ("models", ("model", "transformer", "lstm", "physics", "build", "objectives")),
    ("runs", ("data", "batches", "ngram", "checkpoint", "lock", "provenance", "rundata", "runs",
              "evaluation", "trainer", "generate")),
    ("analysis", ("criteria", "plots", "study_figures", "statistics", "report_tables", "samples",
                  "report", "history", "progress")),
    ("workflows", ("executor", "variants", "study", "external", "study_report", "pipeline",
                   "search", "search_report")),
    ("entry points", ("__main__", "colab")),
)


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the variable is set.

    Spinning threads take the core from the thread doing the work: on a shared 2-core CPU a
    training step of many small operations took 2x the naive floor instead of 0.54x
    (benchmarks/README.md). OpenMP reads the variable once, when torch loads it, so each
    entry point calls this before torch is imported: the command line, every notebook's
    first cell, the pool's worker processes and the benchmarks. Importing physlm does not.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def work_from_repo_root() -> None:
    """Make a notebook started in notebooks/ work from the repository root, where the
    parameters' relative paths (params/, runs/, reports/, data) are meant."""
    here = os.getcwd()
    if os.path.basename(here) == "notebooks" and os.path.isdir(os.path.join(here, "..", "physlm")):
        os.chdir("..")
