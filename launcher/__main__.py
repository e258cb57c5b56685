"""``python -m launcher``: the ``instructloop`` command."""

from launcher.cli import app

app()
