"""The dev stack of ``postroom dev``: an embedded Redis, a mail sink, the processes."""
