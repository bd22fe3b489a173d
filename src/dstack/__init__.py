"""dstack: workflows as code for AI researchers."""

__version__ = "0.6.0"
