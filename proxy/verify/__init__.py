"""The validator: prove two databases hold the same rows (checksums, sampling, row differences) and repair them."""
