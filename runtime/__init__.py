"""deeprecon.runtime: loads a model bundle and a study, runs the pipeline, writes outputs.

The core imports without torch; torch is one backend among others.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deeprecon-rt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
