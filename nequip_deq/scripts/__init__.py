"""Command-line tools of nequip-deq."""
