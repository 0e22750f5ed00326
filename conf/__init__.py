"""The app's Hydra configs. In an installed lora3 this folder is the package `lora3.run.conf`
(pyproject.toml maps it at build time), which the app reads as `pkg://lora3.run.conf`."""
