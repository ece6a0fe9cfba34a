"""Lightning composition: modules, data modules and callbacks (the only Lightning-aware code)."""
