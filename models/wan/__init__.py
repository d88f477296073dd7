"""Wan2.1 text-to-video: callbacks for the standard stages and a tiny random checkpoint for tests."""
