"""deeprecon.runtime: loads a model bundle and a study, runs the pipeline, writes outputs.

The core imports without torch; torch is one backend among others.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deeprecon-rt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# The embedding API, resolved on first use so that importing the package stays light
# (no torch, no scipy) for code that only reads studies.
_LAZY = {"Reconstructor": "pipeline", "adapt_motion": "motion", "load_bundle": "bundle",
         "Result": "result", "load_study": "io", "write_outputs": "outputs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
