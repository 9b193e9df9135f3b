# Relay engine: filled in by the data-path work.
