"""Importers: published emotion-corpus annotations -> MicroEmo manifests (``microemo import``)."""

FORMATS = ("meld", "emer", "mer", "generic")
