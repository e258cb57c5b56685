"""instructloop's inference server: TGI protocol, continuous batching, policy hot-swap."""
