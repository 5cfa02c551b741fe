"""DARTS (Liu, Simonyan & Yang, ICLR 2019): cell search space, edge relaxation, bi-level search."""
