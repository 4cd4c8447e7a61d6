"""Report sections: ``core`` (from the feature artefact) and ``stored`` (other stages' artefacts)."""

__all__ = ["core", "stored"]
