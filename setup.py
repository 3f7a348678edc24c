"""Install the repository's top-level folders under one namespace: hub/ -> beamhub.hub, and so on.

The folders keep the project's agreed layout; the wheel holds only `beamhub/` so that it never
shadows another project's `hub` or `widgets`. Every folder keeps its name inside `beamhub/`, so a
shipped file has the same relative name in the checkout and installed (`streaming/templates/...`).
Folders of data only (hub/enclaves/, streaming/templates/, hub/up/node/, ...) are listed as
namespace packages, so their files ship by the package-data rules in pyproject.toml.
Metadata lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

TOP = ["auth", "hub", "kernels", "streaming", "widgets", "bench", "notebooks"]
SKIP = ["__pycache__", "*.__pycache__", "node_modules", "*.node_modules", "*.node_modules.*"]
packages, package_dir = [], {}
for top in TOP:
    package_dir[f"beamhub.{top}"] = top
    subs = find_namespace_packages(top, exclude=SKIP)
    packages += [f"beamhub.{top}"] + [f"beamhub.{top}.{sub}" for sub in subs]

setup(packages=packages, package_dir=package_dir)
