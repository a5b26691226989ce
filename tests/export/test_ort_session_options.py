"""ONNX Runtime sessions of the backend do not spin their worker threads after a run (the
spinning competed with the torch mask pasting that follows; see docs/performance.md)."""

from __future__ import annotations

from serving import Segmenter


def test_sessions_do_not_spin(tiny_export):
    seg = Segmenter.from_onnx(tiny_export.sidecar, device="cpu", threads=1)
    for session in seg.backend.sessions.values():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == 1
