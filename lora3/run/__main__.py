"""`python -m lora3.run ...`: the Hydra app (see `lora3.run.cli`)."""

from lora3.run.cli import main

main()
