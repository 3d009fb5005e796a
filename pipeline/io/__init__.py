"""Files in and out: tables and data sources, read-ahead, hashes, atomic outputs and where a command may write."""
