from mlxring.cli import main

main()
