"""``steer ab``: experiment results from a server (``cli``, ``plot``) and offline A/B runs of
presets or steering variants over prompt sets (``offline``, rendered by ``report``)."""
