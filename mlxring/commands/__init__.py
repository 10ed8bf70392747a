"""The command-line tools beside `mlxring node`: status, top and bench."""
