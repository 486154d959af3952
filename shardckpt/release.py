"""The release of this package: what writers record in every manifest, and what
``pyproject.toml`` reads as the version (one place)."""

__version__ = "0.1.0"
