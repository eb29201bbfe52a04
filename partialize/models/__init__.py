"""Native models registered with timm on import."""
