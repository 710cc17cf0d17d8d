"""The `editflow` commands, one module per command: argument parsing, error reporting and printing only.

Each module has `main(argv)`; `editflow/cli.py` maps command names to them. The library never imports
from here (tests/test_layout.py checks it).
"""
