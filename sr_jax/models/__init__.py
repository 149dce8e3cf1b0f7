"""Model families, one folder each (`qwen3_vl/`), plus the building blocks they share
(`layers.py`, `attention.py`)."""
