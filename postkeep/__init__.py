"""postkeep: capture, sign, rate-limit and track every message through Postfix."""

__version__ = "0.1.0"
