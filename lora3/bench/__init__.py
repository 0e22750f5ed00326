"""The benchmark: `python -m lora3.bench` (see `lora3.bench.cli` for what it measures).

`cli` plans the jobs, runs each in a worker process (`setups/`) and aggregates the ratios
measured side by side in one run.
"""
