"""The table contract: what a table must hold, what a trained model carries of its training table, drift."""
