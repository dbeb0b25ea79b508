"""The ``deeprecon-rt`` console script: checks that the command line's own dependencies
(typer, rich: the ``cli`` extra) import, then runs :func:`deeprecon.runtime.cli.main`.
Without them it prints one line naming the extra and exits 69, never a traceback; the
runtime's Python API needs neither."""
from __future__ import annotations

import importlib
import sys

#: what the command line imports beyond the runtime's core (the ``cli`` extra)
CLI_MODULES = ("typer", "rich")
CLI_EXTRA = "pip install 'deeprecon-rt[cli]'"


def missing_cli_modules() -> list[str]:
    """The modules of :data:`CLI_MODULES` that cannot be imported here."""
    missing = []
    for name in CLI_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main() -> None:
    """Console-script entry point: exits with the command's exit code."""
    missing = missing_cli_modules()
    if missing:
        from deeprecon.runtime.errors import ExitCode

        sys.stderr.write(f"deeprecon-rt: error: the command line needs {' and '.join(missing)}, "
                         f"which {'is' if len(missing) == 1 else 'are'} not installed: "
                         f"{CLI_EXTRA}\n")
        sys.exit(int(ExitCode.UNAVAILABLE))
    from deeprecon.runtime.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
