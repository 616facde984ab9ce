"""cpreg: ConceptPrune concept erasure with a versioned mask registry."""

__version__ = "0.1.0"
