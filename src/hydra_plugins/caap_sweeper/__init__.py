"""caap's Hydra sweeper plugin (`hydra/sweeper=caap`), found by Hydra's plugin discovery in `hydra_plugins`."""
