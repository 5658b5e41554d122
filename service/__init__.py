"""FastAPI search service (text -> images, image -> captions).

Not implemented yet: tracked by the issue "Search service: FastAPI two-stage search ...".
"""
