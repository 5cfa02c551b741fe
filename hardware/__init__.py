"""Hardware targets, exact cost counts, latency tables and budgets."""
