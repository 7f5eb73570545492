"""Test support: the proxy run in a thread, and a TCP fault relay."""
