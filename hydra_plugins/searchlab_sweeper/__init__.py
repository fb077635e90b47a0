"""searchlab's Hydra sweeper plugin: `hydra/sweeper=searchlab` (see searchlab_sweeper.py)."""
