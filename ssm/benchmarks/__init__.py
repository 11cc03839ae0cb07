"""Benchmark cases of `python -m ssm bench`, one module per op family; each registers its ops
with `ssm.bench.register` when imported (`ssm.bench.load_cases` imports them all)."""
