"""medxfer: a staged transfer-learning pipeline for medical images."""

__version__ = "0.1.0"
