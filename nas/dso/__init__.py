"""DSO-NAS / Sparse Structure Selection: gates on a traced graph, APG on their scales, dead-structure removal."""
