"""The control plane: immutable routing versions, where they are kept, and how changes spread."""
