"""Model-side training core: loss, optimizer, LoRA-aware train state and the sharded, jitted step."""
