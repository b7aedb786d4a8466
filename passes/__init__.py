"""tread_fx.passes."""
