"""tread_fx.models."""
