"""The feature workshop: custom features made from examples or a description in the running
server (:mod:`.jobs`), stored with the presets and served as ``custom/<name>`` (:mod:`.custom`)."""
