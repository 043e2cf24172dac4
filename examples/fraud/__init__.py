"""The transaction-fraud example (README.md); run it as ``python examples/fraud/run.py COMMAND``."""
