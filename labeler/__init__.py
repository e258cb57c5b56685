"""The labeler room: a scripted labeler, an HTTP client of the gateway API only (imports no room)."""
