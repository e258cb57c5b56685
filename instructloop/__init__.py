"""instructloop's shared package: what more than one room (serve, gateway, learner) needs.

- ``events``: the self-contained JSON events of the four streams.
- ``streams``: stream names and how an event is written to / read from a Redis stream entry.
- ``registry``: versioned policy folders (manifest + sha256), validation and the *current* pointer.
- ``settings``: helpers shared by each deployable's one ``Settings`` object.
- ``model``: the offline default model (SmolLM2-135M-Instruct) prepared once into a plain HF folder.
- ``logs``: structured (JSON) logging.

Nothing else belongs here.
"""

__version__ = "0.1.0"
