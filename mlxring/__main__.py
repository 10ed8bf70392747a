"""`python -m mlxring`: the same commands as the `mlxring` script."""

from mlxring.cli import main

main()
