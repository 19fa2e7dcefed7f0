"""`python -m arccompress.cli`: the `arccompress` command."""

from . import command

command()
