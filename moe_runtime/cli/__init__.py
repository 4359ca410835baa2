"""The `moe-runtime` command line: one module per subcommand group, dispatched from main.py."""
