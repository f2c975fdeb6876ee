"""proxyd: a multiprocess pre-fork TCP and HTTP/1.1 reverse proxy for Linux."""

__version__ = "0.1.0"
