"""Package discovery for a layout with two mapped directories: ``commands/`` installs as
``itera.commands`` and ``configs/`` (YAML presets, package data) as ``itera.configs``. Everything
else is in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = {"itera.commands": "commands", "itera.configs": "configs"}

packages = find_packages(include=["itera", "itera.*"])
for package, directory in MAPPED.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(where=directory)]

setup(packages=packages, package_dir=MAPPED)
