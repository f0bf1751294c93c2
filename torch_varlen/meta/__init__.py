"""Fake (meta) implementations: output shapes only, never a host read (DESIGN.md rule 2)."""

from . import attention, padding  # noqa: F401  (registers the fakes)
