"""Data: datasets prepared as one tensor artefact, or streamed from an image folder's manifest."""
