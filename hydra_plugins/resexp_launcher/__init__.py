"""resexp's Hydra launcher; Hydra finds plugins in the `hydra_plugins` namespace package."""
