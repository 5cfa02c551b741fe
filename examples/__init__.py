"""Example user models for tests, the README and the acceptance runs."""
