"""The offline demo library: corpora, expert models trained on them, a profile, a router."""
