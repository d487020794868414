"""The user-facing harness behind the ``kvpolicy`` command."""
