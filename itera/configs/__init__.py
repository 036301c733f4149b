"""itera's YAML presets, installed as package data (``itera.configs``) and read with
:mod:`importlib.resources`: ``students/`` (student shapes for distill), ``power/`` (profiles
for benchmark-power's labelled estimates) and ``cluster.yaml`` (discover-cluster's allowlist)."""
