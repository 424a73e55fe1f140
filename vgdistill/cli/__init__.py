"""Typer command-line interface: one module per subcommand."""
