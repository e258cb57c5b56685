"""instructloop's contracts: what more than one room (serve, gateway, learner, labeler, launcher) must
agree on.

- ``events``: the self-contained JSON events of the five streams, and rankings → pairs.
- ``streams``: stream names and how an event is written to / read from a Redis stream entry.
- ``registry``: versioned policy folders (manifest + sha256), validation and the *current* pointer.
- ``wire``: header names, reserved version names, thresholds the rooms must agree on.
- ``stackfile``: the typed ``stack.json`` that ``instructloop up`` writes for its clients.
- ``settings``: helpers shared by each deployable's one ``Settings`` object.
- ``model``: the offline default model (SmolLM2-135M-Instruct) prepared once into a plain HF folder.
- ``logs``: structured (JSON) logging.

Nothing else belongs here, and nothing here imports a room.
"""

__version__ = "0.1.0"
