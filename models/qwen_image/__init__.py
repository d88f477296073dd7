"""Qwen-Image: callbacks for the standard stages and a tiny random checkpoint for tests."""
