"""Tiny-model builders, one module per family (see mmpeft.models.tiny)."""
