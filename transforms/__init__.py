"""Grappler-style GraphDef passes: one pass per module, shared helpers in ``graph``."""
