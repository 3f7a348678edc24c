"""Install the repository's top-level folders under one namespace: hub/ -> beamhub.hub, and so on.

The folders keep the project's agreed layout; the wheel holds only `beamhub/` so that it never
shadows another project's `hub` or `widgets`. Metadata lives in pyproject.toml.
"""

from setuptools import find_packages, setup

TOP = ["auth", "hub", "kernels", "streaming", "widgets", "bench"]
packages = ["beamhub.notebooks"]
package_dir = {"beamhub.notebooks": "notebooks"}
for top in TOP:
    package_dir[f"beamhub.{top}"] = top
    packages += [f"beamhub.{top}"] + [f"beamhub.{top}.{sub}" for sub in find_packages(top)]

setup(packages=packages, package_dir=package_dir)
