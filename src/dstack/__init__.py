"""dstack: workflows as code for AI researchers."""

__version__ = "0.5.0"
