"""tread_fx.tools."""
