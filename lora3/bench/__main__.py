"""`python -m lora3.bench ...`: the benchmark (see `lora3.bench.cli`)."""

import sys

from lora3.bench.cli import main

sys.exit(main())
