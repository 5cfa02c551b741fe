"""Sample-based architecture search on the DARTS cell space: NAO, RL, evolution, random search."""
