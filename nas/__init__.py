"""Architecture search internals: one subpackage per family of methods."""
