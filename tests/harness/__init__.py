"""Test harness: real components started by the tests (test guest, libvirtd helpers, models)."""
