"""Block-sparse layouts (filled in below)."""
