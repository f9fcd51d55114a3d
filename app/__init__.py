"""charnn HTTP service."""
