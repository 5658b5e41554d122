"""Test helper: an ONNX Runtime session wrapped so that each run is noted (which of an encoder's sessions ran)."""

from __future__ import annotations


class RecordingSession:
    """Runs ``session`` for real and appends ``name`` to ``calls`` each time (tests of the wide query encoding)."""

    def __init__(self, session, name: str, calls: list[str]) -> None:
        self.session, self.name, self.calls = session, name, calls

    def run(self, *args):
        self.calls.append(self.name)
        return self.session.run(*args)
