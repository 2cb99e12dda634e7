"""Policy checkpoints shipped with dreamrt (docs/shipped_checkpoints.md); `shipped:<name>` finds them."""
