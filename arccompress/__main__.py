"""`python -m arccompress`: the `arccompress` command."""

from .cli import command

command()
