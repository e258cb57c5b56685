"""instructloop's gateway: OpenAI-compatible completions, preference feedback, demonstrations, admin."""
