"""Offline index builder (gallery -> FAISS indices + cached multi-level features).

Not implemented yet: tracked by the issue "Index builder: gallery -> FAISS indices ...".
"""
