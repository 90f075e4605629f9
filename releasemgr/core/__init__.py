"""The model-free core every layer may import: scrubbing of secrets and the error vocabulary."""
