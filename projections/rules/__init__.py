"""Pure rules of the read path: validation, status derivation and wire shapes.

Nothing here performs I/O or reads the clock; callers pass `now` and the facts they loaded.
"""
