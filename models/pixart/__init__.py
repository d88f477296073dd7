"""PixArt-Sigma: callbacks for the standard stages and a tiny random checkpoint for tests."""
