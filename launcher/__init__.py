"""The launcher room: the ``instructloop`` CLI and ``instructloop up`` (the stack supervisor).

It may import every room (it mounts their CLIs); no room imports it.
"""
