"""Package discovery for a layout with two mapped directories: ``commands/`` installs as
``itera.commands`` and ``configs/`` (YAML presets, package data) as ``itera.configs``. Everything
else is in pyproject.toml. Directories of data files only (``itera/schema``, ``configs/power``)
are packages too, found as namespace packages, so that setuptools ships them on purpose."""

from setuptools import find_namespace_packages, setup

MAPPED = {"itera.commands": "commands", "itera.configs": "configs"}
CACHES = ["__pycache__", "*.__pycache__"]

packages = find_namespace_packages(include=["itera", "itera.*"], exclude=CACHES)
for package, directory in MAPPED.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_namespace_packages(where=directory, exclude=CACHES)]

setup(packages=packages, package_dir=MAPPED)
