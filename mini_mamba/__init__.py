"""mini-mamba: Mamba's selective scan, read top to bottom."""
