"""Fault suite (issue 16): each test injects one failure into a real run — a task process killed with
SIGKILL, the database stopped, the triggerer restarted, a worker lost, a Vertex job or its output gone
wrong, a hostile corpus — and asserts the exact final counts plus the store's invariants
(``tests/faults/conftest.py::check_invariants``)."""
