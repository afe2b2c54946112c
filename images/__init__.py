"""Container images: Jinja2 Dockerfile templates per (kind, profile), built with the Docker SDK."""
