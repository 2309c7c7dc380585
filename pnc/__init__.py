"""pnc: progressive neural collapse, measured layer by layer."""
__version__ = "0.1.0"
