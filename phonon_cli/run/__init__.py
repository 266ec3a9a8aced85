"""The run loop: sources in, routed updates through the cache, batched Redis work."""
