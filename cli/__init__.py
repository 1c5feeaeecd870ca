"""The Typer application `lad-fast` (imported as lad_fast.cli)."""
