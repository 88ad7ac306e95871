"""Prints the Python requirements of the development environment, one per line.

Reads them from pyproject.toml (the only list): the runtime dependencies, maturin, and the
extras named on the command line.
"""

from __future__ import annotations

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
project = meta["project"]
reqs = list(project["dependencies"]) + list(meta["build-system"]["requires"])
for extra in sys.argv[1:]:
    reqs += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs)))
